-- Lease: provisioning → ready (the provider delivered). Only a confirmed lease in
-- 'provisioning', still on the pool generation it was granted on, before its provision
-- deadline; the seq moves by one (the lease.ready event's), ready_at is recorded and the
-- deadline leaves the sweep's index. Anything else is refused with what is there instead.
-- KEYS[1] lease hash, KEYS[2] its pool's hash, KEYS[3] the region's provisioning zset,
-- KEYS[4] the region's lease outbox (optional: the lease.ready owed is written there,
-- docs/lifecycle.md "Outbox")
-- ARGV[1] lease id, ARGV[2] now (epoch s), ARGV[3] the event's at (RFC 3339)
-- Reply: {1, seq, lease json} or {0, why} with why one of 'gone', 'pending', 'ready' (or
-- another state), 'generation' (the pool was removed or registered again), 'deadline'
local f = redis.call('HMGET', KEYS[1], 'state', 'pending', 'deadline', 'generation', 'seq', 'info')
if not f[6] then return {0, 'gone'} end
if f[2] then return {0, 'pending'} end
local state = f[1] or 'ready'
if state ~= 'provisioning' then return {0, state} end
local pool_gen = tonumber(redis.call('HGET', KEYS[2], 'generation')) or 0
if redis.call('EXISTS', KEYS[2]) == 0 or not cb_same_generation(tonumber(f[4]) or 0, pool_gen) then
  return {0, 'generation'}
end
local now = tonumber(ARGV[2])
if (tonumber(f[3]) or 0) <= now then return {0, 'deadline'} end
local seq = tonumber(f[5]) + 1
redis.call('HSET', KEYS[1], 'state', 'ready', 'ready_at', ARGV[2], 'seq', seq)
redis.call('ZREM', KEYS[3], ARGV[1])
if KEYS[4] then
  redis.call('HSET', KEYS[4], ARGV[1] .. '.' .. seq, cjson.encode({k = 'lease.ready', i = f[6], s = seq,
    t = ARGV[3], w = ARGV[2]}))
end
return {1, seq, f[6]}
