-- Reserve the allocations of one or more placements: each group (one placement's
-- allocations in one region) all or none, independently of the others. Many groups in
-- one call on a single Redis; one group per call on Redis Cluster (a region's keys share
-- a hash slot, different regions do not).
-- A lease is granted on one generation of its pool (one registration of that pool id,
-- from creation to removal) and touches no other: the broker names the generation it
-- matched on, and a group naming one that is no longer there is refused (the pool was
-- removed and registered again since the broker last heard of it).
-- ARGV[1] number of groups; then per group g, its arguments from offset a:
--   ARGV[a] mode ('check' = only if free, 'force' = restore after Redis loss),
--   ARGV[a+1] expires_at (for 'check' a provisional one: the lease is marked pending until
--   the broker, its grant durable, confirms it with the real expiry; an unconfirmed lease
--   ends at the provisional one, so a broker that dies in between leaks nothing for long),
--   ARGV[a+2] n allocations, then per allocation i (0-based): ARGV[a+3+5i] lease id,
--   ARGV[a+4+5i] units, ARGV[a+5+5i] lease json, ARGV[a+6+5i] interruptible (1/0),
--   ARGV[a+7+5i] the pool generation it was matched on (0 = whichever is there)
-- KEYS per group g, from offset k: KEYS[k] region lease-expiry zset, KEYS[k+1] the region's
--   leases-ready marker, KEYS[k+2] the region's set of interruptible leases; then per
--   allocation i: KEYS[k+3+3i] pool hash, KEYS[k+4+3i] the pool's lease set, KEYS[k+5+3i]
--   the lease hash.
-- Reply: one entry per group: {1, free_after_1, ...} or {0, i (1-based), free_of_that_pool}
--   or {-1} (leases not restored yet after a Redis loss: refuse rather than book over them)
local function reserve(k, a)
  local mode, expires, n = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if mode == 'check' and redis.call('EXISTS', KEYS[k + 1]) == 0 then return {-1} end
  local gens, held, demand = {}, {}, {}  -- per allocation: its generation, whether its pool takes the units
  for i = 0, n - 1 do
    local pool, want = KEYS[k + 3 + 3 * i], tonumber(ARGV[a + 7 + 5 * i])
    local f = redis.call('HMGET', pool, 'generation', 'status', 'free')  -- status is set on every pool hash
    local have, free = tonumber(f[1]) or 0, tonumber(f[3]) or 0
    gens[i] = have
    if want ~= 0 then gens[i] = want end
    held[i] = f[2] ~= false and cb_same_generation(gens[i], have)
    if mode == 'check' then
      if not cb_same_generation(want, have) then return {0, i + 1, 0} end
      demand[pool] = (demand[pool] or 0) + tonumber(ARGV[a + 4 + 5 * i])  -- one pool named twice: the sum
      if f[2] ~= 'online' or free < demand[pool] then return {0, i + 1, free} end
      if redis.call('EXISTS', KEYS[k + 5 + 3 * i]) == 1 then return {0, i + 1, free} end
    end
  end
  local out = {1}
  for i = 0, n - 1 do
    local pool, leases, lease = KEYS[k + 3 + 3 * i], KEYS[k + 4 + 3 * i], KEYS[k + 5 + 3 * i]
    local lease_id, units, interruptible = ARGV[a + 3 + 5 * i], tonumber(ARGV[a + 4 + 5 * i]), ARGV[a + 6 + 5 * i]
    if held[i] then
      redis.call('HINCRBY', pool, 'leased', units)
      out[#out + 1] = cb_recompute(pool)[2]
    else
      out[#out + 1] = 0
    end
    redis.call('HSET', lease, 'info', ARGV[a + 5 + 5 * i], 'units', units, 'expires', expires, 'seq', 1,
      'interruptible', interruptible, 'pool', pool, 'generation', gens[i])
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
  k, a = k + 3 + 3 * n, a + 3 + 5 * n
end
return replies
