-- Live state of one pool: every change goes through this one script so that
-- free = max(0, effective capacity - leased) holds after every command, and the
-- status transition it caused is returned for the caller to publish.
--
-- The durable record (the registry's key-value bucket) is the authority on a pool's
-- existence, owner and generation; this hash follows it. A hash holds one generation
-- (one registration, from creation to removal) and the record revision it reflects:
-- a write from an older generation or revision changes nothing (code 3), so writers
-- racing each other leave Redis with what the record holds last, whatever their order.
--
-- KEYS[1] pool hash, KEYS[2] region pool set, KEYS[3] region heartbeat zset,
-- KEYS[4] the pool's lease set (read only: the leases a removal or an outage loses),
-- KEYS[5] the region's removed generations (pool id -> the last generation removed: a
--   late write of a removed generation must not bring the pool back)
-- (and, for a pool that shares its devices, its per-device hash: cb_devices_key, the pool
--  hash's key + ':dev', in the same hash slot)
-- ARGV[1] op, ARGV[2] now (unix seconds), ARGV[3] pool id, ARGV[4] provider ("" = any)
-- Reply: {code, prev_status, status, free, overcommit, leased, capacity, generation,
--         {lease ids lost}, replaced_generation}
--   code: 1 ok / 2 created, 0 not found, -1 owned by another provider,
--         -2 another generation of the pool is there, 3 stale write (nothing written)
local pool, members, hb, pool_leases, removed = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op, now, pool_id, provider = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]

local function generation()
  return tonumber(redis.call('HGET', pool, 'generation')) or 0
end

local function reply(code, prev, lost, replaced)
  local r = cb_recompute(pool)
  return {code, prev, r[1], r[2], r[3], r[4], r[5], generation(), lost or {}, replaced or 0}
end

-- A pool that shares its devices (the record's spec.sharing.mode is not 'none') keeps
-- free milli per device (pool_state.lua): devices 0..capacity-1 are there, a new one all
-- free. When the capacity shrinks, a device past it that is wholly free goes; one with a
-- share or a whole lease taken stays until that lease ends (as units leased past a shrunk
-- capacity stay, counted as overcommit). A pool that stops sharing drops the hash (the
-- registry refuses that change while a pool is registered: docs/sharing.md).
local function follow_devices(record, capacity)
  local mode, upn, min_milli, max_milli = 'none', 8, 1, CB_MILLI
  -- most pools do not share: no need to decode their record (msgspec writes the default)
  local ok, rec = false, nil
  if string.find(record, '"sharing":', 1, true) and not string.find(record, '"sharing":{"mode":"none"', 1, true) then
    ok, rec = pcall(cjson.decode, record)
  end
  if ok and type(rec) == 'table' and type(rec.spec) == 'table' then
    local sharing = rec.spec.sharing
    if type(sharing) == 'table' and type(sharing.mode) == 'string' then
      mode, min_milli = sharing.mode, tonumber(sharing.min_milli) or min_milli
      max_milli = tonumber(sharing.max_milli) or max_milli
    end
    upn = tonumber(rec.spec.units_per_node) or upn
  end
  local dev = cb_devices_key(pool)
  if mode == 'none' then
    redis.call('DEL', dev)
    redis.call('HDEL', pool, 'sharing', 'upn', 'min_milli', 'max_milli')
    return
  end
  redis.call('HSET', pool, 'sharing', mode, 'upn', upn, 'min_milli', min_milli, 'max_milli', max_milli)
  for d = 0, capacity - 1 do redis.call('HSETNX', dev, d, CB_MILLI) end
  local all = redis.call('HGETALL', dev)
  for i = 1, #all, 2 do
    if tonumber(all[i]) >= capacity and tonumber(all[i + 1]) >= CB_MILLI then redis.call('HDEL', dev, all[i]) end
  end
end

local function refused(code, prev)
  return {code, prev, prev, 0, 0, 0, 0, 0, {}, 0}
end

local exists = redis.call('EXISTS', pool) == 1
local prev = 'absent'
if exists then
  prev = redis.call('HGET', pool, 'status') or 'offline'
  if provider ~= '' and redis.call('HGET', pool, 'provider') ~= provider then
    return refused(-1, prev)
  end
end

if op == 'upsert' then
  -- ARGV[5] capacity, ARGV[6] record json, ARGV[7] model, ARGV[8] owner provider,
  -- ARGV[9] generation, ARGV[10] record revision
  local gen, rev = tonumber(ARGV[9]), tonumber(ARGV[10])
  local replaced, lost = 0, {}
  if exists then
    local f = redis.call('HMGET', pool, 'generation', 'rev', 'provider')
    local have = tonumber(f[1])
    if have ~= nil and have > gen then return refused(3, prev) end  -- a newer registration is here
    if have == nil or have == gen then
      if f[3] ~= ARGV[8] then return refused(-1, prev) end  -- a generation has one owner
      if (tonumber(f[2]) or 0) > rev then return refused(3, prev) end  -- a newer record revision is here
    else
      -- an older generation the record no longer holds (its removal did not reach Redis):
      -- the new one starts from nothing leased; the old one's leases are lost
      replaced, lost = have, redis.call('SMEMBERS', pool_leases)
      redis.call('DEL', pool, cb_devices_key(pool))
      exists, prev = false, 'absent'
    end
  end
  if not exists then
    if gen <= (tonumber(redis.call('HGET', removed, pool_id)) or 0) then return refused(3, prev) end
    redis.call('HDEL', removed, pool_id)
  end
  redis.call('HSET', pool, 'capacity', ARGV[5], 'record', ARGV[6], 'model', ARGV[7],
    'provider', ARGV[8], 'alive', 1, 'last_hb', now, 'generation', gen, 'rev', rev)
  if not exists then
    redis.call('DEL', cb_devices_key(pool))  -- a removed generation's devices are not this one's
    redis.call('HSET', pool, 'leased', 0, 'healthy', -1, 'draining', 0)
  end
  follow_devices(ARGV[6], tonumber(ARGV[5]))
  redis.call('SADD', members, pool_id)
  redis.call('ZADD', hb, now, pool_id)
  if exists then return reply(1, prev) end
  return reply(2, prev, lost, replaced)
end

if not exists then return refused(0, prev) end

if op == 'heartbeat' then
  -- ARGV[5] healthy units, or -2 when the heartbeat did not say
  local healthy = tonumber(ARGV[5])
  if healthy ~= -2 then redis.call('HSET', pool, 'healthy', healthy) end
  redis.call('HSET', pool, 'alive', 1, 'last_hb', now)
  redis.call('ZADD', hb, now, pool_id)
  return reply(1, prev)
elseif op == 'patch' then
  -- ARGV[5] capacity, ARGV[6] record json, ARGV[7] generation, ARGV[8] record revision
  if generation() ~= tonumber(ARGV[7]) then return refused(-2, prev) end
  if (tonumber(redis.call('HGET', pool, 'rev')) or 0) > tonumber(ARGV[8]) then return refused(3, prev) end
  redis.call('HSET', pool, 'capacity', ARGV[5], 'record', ARGV[6], 'rev', ARGV[8])
  follow_devices(ARGV[6], tonumber(ARGV[5]))
  return reply(1, prev)
elseif op == 'drain' then
  redis.call('HSET', pool, 'draining', 1)
  return reply(1, prev)
elseif op == 'undrain' then
  redis.call('HSET', pool, 'draining', 0)
  return reply(1, prev)
elseif op == 'expire' then
  -- ARGV[5] cutoff: offline only if the last heartbeat is still older than it
  local last = tonumber(redis.call('HGET', pool, 'last_hb')) or 0
  if last >= tonumber(ARGV[5]) then
    return reply(1, prev)
  end
  redis.call('HSET', pool, 'alive', 0)
  redis.call('ZREM', hb, pool_id)
  local lost = {}
  if prev ~= 'offline' then lost = redis.call('SMEMBERS', pool_leases) end
  return reply(1, prev, lost)
elseif op == 'remove' then
  -- ARGV[5] generation to remove (0 = whichever is there)
  local gen = generation()
  if tonumber(ARGV[5]) ~= 0 and gen ~= tonumber(ARGV[5]) then return refused(-2, prev) end
  local leased = tonumber(redis.call('HGET', pool, 'leased')) or 0
  local lost = redis.call('SMEMBERS', pool_leases)
  redis.call('DEL', pool, cb_devices_key(pool))
  redis.call('SREM', members, pool_id)
  redis.call('ZREM', hb, pool_id)
  if gen > 0 then redis.call('HSET', removed, pool_id, gen) end
  return {1, prev, 'removed', 0, 0, leased, 0, gen, lost, 0}
end
return redis.error_reply('unknown op ' .. op)
