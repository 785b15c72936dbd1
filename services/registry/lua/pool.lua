-- Live state of one pool: every change goes through this one script so that
-- free = max(0, effective capacity - leased) holds after every command, and the
-- status transition it caused is returned for the caller to publish.
--
-- KEYS[1] pool hash, KEYS[2] region pool set, KEYS[3] region heartbeat zset
-- ARGV[1] op, ARGV[2] now (unix seconds), ARGV[3] pool id, ARGV[4] provider ("" = any)
-- Reply: {code, prev_status, status, free, overcommit, leased, capacity}
--   code: 1 ok / 2 created, 0 not found, -1 owned by another provider
local pool, members, hb = KEYS[1], KEYS[2], KEYS[3]
local op, now, pool_id, provider = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]

local function reply(code, prev)
  local r = cb_recompute(pool)
  return {code, prev, r[1], r[2], r[3], r[4], r[5]}
end

local exists = redis.call('EXISTS', pool) == 1
local prev = 'absent'
if exists then
  prev = redis.call('HGET', pool, 'status') or 'offline'
  if provider ~= '' and redis.call('HGET', pool, 'provider') ~= provider then
    return {-1, prev, prev, 0, 0, 0, 0}
  end
end

if op == 'upsert' then
  -- ARGV[5] capacity, ARGV[6] record json, ARGV[7] model, ARGV[8] owner provider
  redis.call('HSET', pool, 'capacity', ARGV[5], 'record', ARGV[6], 'model', ARGV[7],
    'provider', ARGV[8], 'alive', 1, 'last_hb', now)
  if not exists then
    redis.call('HSET', pool, 'leased', 0, 'healthy', -1, 'draining', 0)
  end
  redis.call('HINCRBY', pool, 'gen', 1)
  redis.call('SADD', members, pool_id)
  redis.call('ZADD', hb, now, pool_id)
  if exists then return reply(1, prev) end
  return reply(2, prev)
end

if not exists then return {0, prev, prev, 0, 0, 0, 0} end

if op == 'heartbeat' then
  -- ARGV[5] healthy units, or -2 when the heartbeat did not say
  local healthy = tonumber(ARGV[5])
  if healthy ~= -2 then redis.call('HSET', pool, 'healthy', healthy) end
  redis.call('HSET', pool, 'alive', 1, 'last_hb', now)
  redis.call('ZADD', hb, now, pool_id)
  return reply(1, prev)
elseif op == 'patch' then
  -- ARGV[5] capacity, ARGV[6] record json
  redis.call('HSET', pool, 'capacity', ARGV[5], 'record', ARGV[6])
  redis.call('HINCRBY', pool, 'gen', 1)
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
  return reply(1, prev)
elseif op == 'remove' then
  local leased = tonumber(redis.call('HGET', pool, 'leased')) or 0
  redis.call('DEL', pool)
  redis.call('SREM', members, pool_id)
  redis.call('ZREM', hb, pool_id)
  return {1, prev, 'removed', 0, 0, leased, 0}
end
return redis.error_reply('unknown op ' .. op)
