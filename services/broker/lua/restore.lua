-- Put many leases of one region back after a Redis loss: each takes its units whatever
-- is free (it was granted when they were) and keeps its per-lease seq. One call for many
-- leases, each pool's numbers recomputed once (rebuilding 50,000 leases must be quick).
-- KEYS[1] region lease-expiry zset, KEYS[2] region set of interruptible leases; then per
--   lease i (0-based): KEYS[3+3i] pool hash, KEYS[4+3i] the pool's lease set, KEYS[5+3i] lease hash
-- ARGV per lease i: ARGV[1+6i] lease id, ARGV[2+6i] units, ARGV[3+6i] lease json,
--   ARGV[4+6i] interruptible (1/0), ARGV[5+6i] expires_at, ARGV[6+6i] seq
-- Reply: the number of leases restored (a lease already present is left as it is)
local n = (#KEYS - 2) / 3
local dirty, order, restored = {}, {}, 0
for i = 0, n - 1 do
  local pool, leases, lease = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  local lease_id, units = ARGV[1 + 6 * i], tonumber(ARGV[2 + 6 * i])
  if redis.call('EXISTS', lease) == 0 then
    if redis.call('EXISTS', pool) == 1 then
      redis.call('HINCRBY', pool, 'leased', units)
      if not dirty[pool] then dirty[pool] = true; order[#order + 1] = pool end
    end
    redis.call('HSET', lease, 'info', ARGV[3 + 6 * i], 'units', units, 'expires', ARGV[5 + 6 * i],
      'seq', ARGV[6 + 6 * i], 'interruptible', ARGV[4 + 6 * i], 'pool', pool)
    redis.call('SADD', leases, lease_id)
    if ARGV[4 + 6 * i] == '1' then redis.call('SADD', KEYS[2], lease_id) end
    redis.call('ZADD', KEYS[1], ARGV[5 + 6 * i], lease_id)
    restored = restored + 1
  end
end
for _, pool in ipairs(order) do cb_recompute(pool) end
return restored
