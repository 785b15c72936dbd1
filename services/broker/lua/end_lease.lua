-- End one lease and give its units back: release, expire, preempt, lose, revoke, fail
-- (provisioning → failed: the provider said so) and timeout (provisioning → failed: no
-- ready by its provision deadline).
-- The units go back only to the pool generation the lease was granted on: a pool removed
-- and registered again under the same id is another pool, which this lease never held.
-- KEYS[1] region lease-expiry zset, KEYS[2] lease hash, KEYS[3] pool hash, KEYS[4] pool lease set,
-- KEYS[5] region set of interruptible leases, KEYS[6] region provisioning zset (optional),
-- KEYS[7] region lease outbox (optional; with ARGV[5..7] the event owed: docs/lifecycle.md, "Outbox")
-- ARGV[1] lease id, ARGV[2] mode ('expire' re-checks the expiry against ARGV[3] = now;
-- 'timeout' re-checks the provision deadline against it), ARGV[4] the state the lease must
-- be in ('provisioning' or 'ready'; '' or absent: any). A lease without a state field is a
-- capacity-only one: 'ready' from its grant. An unconfirmed (pending) lease has no state
-- yet: a required state refuses it.
-- A lease on a pool that shares its devices gives its milli back to the devices it holds
-- (its hash's 'devices' and 'milli'), on the same generation only.
-- Reply: {1, lease json, seq, free_after, pending, {devices' free milli after}} or {0} when
-- there is nothing (left) to end,
-- or {0, state} when the lease is in another state than required;
-- free_after -1: no pool (of the lease's generation) was touched;
-- pending = 1: the broker never confirmed the grant (it died before its event was durable)
local lease = KEYS[2]
if redis.call('EXISTS', lease) == 0 then
  if KEYS[6] then redis.call('ZREM', KEYS[6], ARGV[1]) end
  return {0}
end
local f = redis.call('HMGET', lease, 'units', 'expires', 'info', 'seq', 'pending', 'generation', 'state', 'deadline',
  'devices', 'milli')
local mode, want = ARGV[2], ARGV[4] or ''
if mode == 'timeout' then want = 'provisioning' end
if want ~= '' then
  local state = f[7] or 'ready'
  if f[5] then state = 'pending' end
  if state ~= want then return {0, state} end
end
if mode == 'expire' and tonumber(f[2]) > tonumber(ARGV[3]) then return {0} end
if mode == 'timeout' and (tonumber(f[8]) or 0) > tonumber(ARGV[3]) then return {0, 'provisioning'} end
local free, devices_after = -1, {}
local gen = tonumber(f[6]) or 0
local pool_gen = tonumber(redis.call('HGET', KEYS[3], 'generation')) or 0
if redis.call('EXISTS', KEYS[3]) == 1 and cb_same_generation(gen, pool_gen) then
  if f[9] then
    devices_after = cb_give_devices(KEYS[3], cb_split_devices(f[9]), tonumber(f[10]) or CB_MILLI)
  elseif not redis.call('HGET', KEYS[3], 'sharing') then  -- (on a sharing pool, no devices: it held none)
    local leased = tonumber(redis.call('HGET', KEYS[3], 'leased')) or 0
    redis.call('HSET', KEYS[3], 'leased', math.max(0, leased - tonumber(f[1])))
  end
  free = cb_recompute(KEYS[3])[2]
end
redis.call('DEL', lease)
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if KEYS[7] and (ARGV[5] or '') ~= '' then  -- the event owed (ARGV[5] type, [6] at, [7] other fields)
  local seq = tonumber(f[4]) + 1
  redis.call('HSET', KEYS[7], ARGV[1] .. '.' .. seq, cjson.encode({k = ARGV[5], i = f[3], s = seq, f = free,
    p = tonumber(f[5]) or 0, t = ARGV[6], x = ARGV[7], w = ARGV[3], d = table.concat(devices_after, ',')}))
end
redis.call('SREM', KEYS[5], ARGV[1])
if KEYS[6] then redis.call('ZREM', KEYS[6], ARGV[1]) end
return {1, f[3], tonumber(f[4]) + 1, free, tonumber(f[5]) or 0, devices_after}
