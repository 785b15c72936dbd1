-- Reserve the allocations of one or more placements: each group (one placement's
-- allocations in one region) all or none, independently of the others. Many groups in
-- one call on a single Redis; one group per call on Redis Cluster (a region's keys share
-- a hash slot, different regions do not).
-- ARGV[1] number of groups; then per group g, its arguments from offset a:
--   ARGV[a] mode ('check' = only if free, 'force' = restore after Redis loss),
--   ARGV[a+1] expires_at (for 'check' a provisional one: the lease is marked pending until
--   the broker, its grant durable, confirms it with the real expiry; an unconfirmed lease
--   ends at the provisional one, so a broker that dies in between leaks nothing for long),
--   ARGV[a+2] n allocations, then per allocation i (0-based): ARGV[a+3+4i] lease id,
--   ARGV[a+4+4i] units, ARGV[a+5+4i] lease json, ARGV[a+6+4i] interruptible (1/0)
-- KEYS per group g, from offset k: KEYS[k] region lease-expiry zset, KEYS[k+1] the region's
--   leases-ready marker, KEYS[k+2] the region's set of interruptible leases; then per
--   allocation i: KEYS[k+3+3i] pool hash, KEYS[k+4+3i] the pool's lease set, KEYS[k+5+3i]
--   the lease hash.
-- Reply: one entry per group: {1, free_after_1, ...} or {0, i (1-based), free_of_that_pool}
--   or {-1} (leases not restored yet after a Redis loss: refuse rather than book over them)
local function reserve(k, a)
  local mode, expires, n = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if mode == 'check' and redis.call('EXISTS', KEYS[k + 1]) == 0 then return {-1} end
  if mode == 'check' then
    for i = 0, n - 1 do
      local pool = KEYS[k + 3 + 3 * i]
      local f = redis.call('HMGET', pool, 'status', 'free')
      local want = tonumber(ARGV[a + 4 + 4 * i])
      if f[1] ~= 'online' or (tonumber(f[2]) or 0) < want then
        return {0, i + 1, tonumber(f[2]) or 0}
      end
      if redis.call('EXISTS', KEYS[k + 5 + 3 * i]) == 1 then return {0, i + 1, tonumber(f[2]) or 0} end
    end
  end
  local out = {1}
  for i = 0, n - 1 do
    local pool, leases, lease = KEYS[k + 3 + 3 * i], KEYS[k + 4 + 3 * i], KEYS[k + 5 + 3 * i]
    local lease_id, units, interruptible = ARGV[a + 3 + 4 * i], tonumber(ARGV[a + 4 + 4 * i]), ARGV[a + 6 + 4 * i]
    if redis.call('EXISTS', pool) == 1 then
      redis.call('HINCRBY', pool, 'leased', units)
      out[#out + 1] = cb_recompute(pool)[2]
    else
      out[#out + 1] = 0
    end
    redis.call('HSET', lease, 'info', ARGV[a + 5 + 4 * i], 'units', units, 'expires', expires, 'seq', 1,
      'interruptible', interruptible, 'pool', pool)
    redis.call('SADD', leases, lease_id)
    if mode == 'check' then redis.call('HSET', lease, 'pending', 1) end
    if interruptible == '1' then redis.call('SADD', KEYS[k + 2], lease_id) end
    redis.call('ZADD', KEYS[k], expires, lease_id)
  end
  return out
end

local replies, k, a = {}, 1, 2
for g = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[a + 2])
  replies[g] = reserve(k, a)
  k, a = k + 3 + 3 * n, a + 3 + 4 * n
end
return replies
