-- Put many leases of one region back after a Redis loss: each takes its units whatever
-- is free (it was granted when they were) and keeps its per-lease seq and its state (a
-- lease whose record says provisioning comes back provisioning, its deadline indexed for
-- the sweep; one that said ready stays ready). One call for many leases, each pool's
-- numbers recomputed once (rebuilding 50,000 leases must be quick).
-- A lease takes units only from the pool generation it was granted on (0: a lease from
-- before generations were recorded takes them from whichever is there); one whose pool
-- was removed, or registered again since, comes back holding nothing.
-- KEYS[1] region lease-expiry zset, KEYS[2] region set of interruptible leases, KEYS[3] region
--   provisioning zset; then per lease i (0-based): KEYS[4+3i] pool hash, KEYS[5+3i] the pool's
--   lease set, KEYS[6+3i] lease hash
-- ARGV per lease i: ARGV[1+12i] lease id, ARGV[2+12i] units, ARGV[3+12i] lease json,
--   ARGV[4+12i] interruptible (1/0), ARGV[5+12i] expires_at, ARGV[6+12i] seq, ARGV[7+12i] pool
--   generation, ARGV[8+12i] state ('' capacity only, 'provisioning' or 'ready'),
--   ARGV[9+12i] provision deadline (provisioning; else 0), ARGV[10+12i] ready_at ('' none),
--   ARGV[11+12i] milli of each device, ARGV[12+12i] the devices it holds ('' none: a pool
--   that does not share); a lease on a sharing pool takes its milli back on those devices
--   (a lease from before the pool shared, naming none, takes nothing there)
-- Reply: the number of leases restored (a lease already present is left as it is)
local n = (#KEYS - 3) / 3
local dirty, order, restored = {}, {}, 0
for i = 0, n - 1 do
  local pool, leases, lease = KEYS[4 + 3 * i], KEYS[5 + 3 * i], KEYS[6 + 3 * i]
  local a = 12 * i
  local lease_id, units, gen = ARGV[1 + a], tonumber(ARGV[2 + a]), tonumber(ARGV[7 + a])
  if redis.call('EXISTS', lease) == 0 then
    local have = tonumber(redis.call('HGET', pool, 'generation')) or 0
    if gen == 0 then gen = have end
    if redis.call('EXISTS', pool) == 1 and cb_same_generation(gen, have) then
      if redis.call('HGET', pool, 'sharing') then
        cb_take_devices(pool, cb_split_devices(ARGV[12 + a]), tonumber(ARGV[11 + a]))
      else
        redis.call('HINCRBY', pool, 'leased', units)
      end
      if not dirty[pool] then dirty[pool] = true; order[#order + 1] = pool end
    end
    redis.call('HSET', lease, 'info', ARGV[3 + a], 'units', units, 'expires', ARGV[5 + a],
      'seq', ARGV[6 + a], 'interruptible', ARGV[4 + a], 'pool', pool, 'generation', gen)
    if ARGV[12 + a] ~= '' then redis.call('HSET', lease, 'milli', ARGV[11 + a], 'devices', ARGV[12 + a]) end
    local state = ARGV[8 + a]
    if state == 'provisioning' then
      redis.call('HSET', lease, 'state', state, 'deadline', ARGV[9 + a])
      redis.call('ZADD', KEYS[3], ARGV[9 + a], lease_id)
    elseif state == 'ready' then
      redis.call('HSET', lease, 'state', state)
      if ARGV[10 + a] ~= '' then redis.call('HSET', lease, 'ready_at', ARGV[10 + a]) end
    end
    redis.call('SADD', leases, lease_id)
    if ARGV[4 + a] == '1' then redis.call('SADD', KEYS[2], lease_id) end
    redis.call('ZADD', KEYS[1], ARGV[5 + a], lease_id)
    restored = restored + 1
  end
end
for _, pool in ipairs(order) do cb_recompute(pool) end
return restored
