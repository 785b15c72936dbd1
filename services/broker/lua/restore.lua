-- Put many leases of one region back after a Redis loss: each takes its units whatever
-- is free (it was granted when they were) and keeps its per-lease seq. One call for many
-- leases, each pool's numbers recomputed once (rebuilding 50,000 leases must be quick).
-- A lease takes units only from the pool generation it was granted on (0: a lease from
-- before generations were recorded takes them from whichever is there); one whose pool
-- was removed, or registered again since, comes back holding nothing.
-- KEYS[1] region lease-expiry zset, KEYS[2] region set of interruptible leases; then per
--   lease i (0-based): KEYS[3+3i] pool hash, KEYS[4+3i] the pool's lease set, KEYS[5+3i] lease hash
-- ARGV per lease i: ARGV[1+7i] lease id, ARGV[2+7i] units, ARGV[3+7i] lease json,
--   ARGV[4+7i] interruptible (1/0), ARGV[5+7i] expires_at, ARGV[6+7i] seq, ARGV[7+7i] pool generation
-- Reply: the number of leases restored (a lease already present is left as it is)
local n = (#KEYS - 2) / 3
local dirty, order, restored = {}, {}, 0
for i = 0, n - 1 do
  local pool, leases, lease = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  local lease_id, units, gen = ARGV[1 + 7 * i], tonumber(ARGV[2 + 7 * i]), tonumber(ARGV[7 + 7 * i])
  if redis.call('EXISTS', lease) == 0 then
    local have = tonumber(redis.call('HGET', pool, 'generation')) or 0
    if gen == 0 then gen = have end
    if redis.call('EXISTS', pool) == 1 and cb_same_generation(gen, have) then
      redis.call('HINCRBY', pool, 'leased', units)
      if not dirty[pool] then dirty[pool] = true; order[#order + 1] = pool end
    end
    redis.call('HSET', lease, 'info', ARGV[3 + 7 * i], 'units', units, 'expires', ARGV[5 + 7 * i],
      'seq', ARGV[6 + 7 * i], 'interruptible', ARGV[4 + 7 * i], 'pool', pool, 'generation', gen)
    redis.call('SADD', leases, lease_id)
    if ARGV[4 + 7 * i] == '1' then redis.call('SADD', KEYS[2], lease_id) end
    redis.call('ZADD', KEYS[1], ARGV[5 + 7 * i], lease_id)
    restored = restored + 1
  end
end
for _, pool in ipairs(order) do cb_recompute(pool) end
return restored
