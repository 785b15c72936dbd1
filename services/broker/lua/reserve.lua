-- Reserve every allocation of a placement in one region, or none.
-- KEYS[1] region lease-expiry zset, KEYS[2] the region's leases-ready marker, KEYS[3] the
--   region's set of interruptible leases; then per allocation i (0-based): KEYS[4+3i] pool
--   hash, KEYS[5+3i] the pool's lease set, KEYS[6+3i] the lease hash.
-- ARGV[1] mode ('check' = only if free, 'force' = restore after Redis loss), ARGV[2] expires_at
--   (for 'check' a provisional one: the lease is marked pending until the broker, its grant
--   durable, confirms it with the real expiry; an unconfirmed lease ends at the provisional
--   one, so a broker that dies in between leaks nothing for long),
--   then per allocation: ARGV[3+4i] lease id, ARGV[4+4i] units, ARGV[5+4i] lease json,
--   ARGV[6+4i] interruptible (1/0)
-- Reply: {1, free_after_1, ...} or {0, i (1-based), free_of_that_pool} or {-1} (leases not
--   restored yet after a Redis loss: refuse rather than book over them)
local mode, expires = ARGV[1], tonumber(ARGV[2])
local n = (#KEYS - 3) / 3
if mode == 'check' and redis.call('EXISTS', KEYS[2]) == 0 then return {-1} end
if mode == 'check' then
  for i = 0, n - 1 do
    local pool = KEYS[4 + 3 * i]
    local f = redis.call('HMGET', pool, 'status', 'free')
    local want = tonumber(ARGV[4 + 4 * i])
    if f[1] ~= 'online' or (tonumber(f[2]) or 0) < want then
      return {0, i + 1, tonumber(f[2]) or 0}
    end
    if redis.call('EXISTS', KEYS[6 + 3 * i]) == 1 then return {0, i + 1, tonumber(f[2]) or 0} end
  end
end
local out = {1}
for i = 0, n - 1 do
  local pool, leases, lease = KEYS[4 + 3 * i], KEYS[5 + 3 * i], KEYS[6 + 3 * i]
  local lease_id, units = ARGV[3 + 4 * i], tonumber(ARGV[4 + 4 * i])
  if redis.call('EXISTS', pool) == 1 then
    redis.call('HINCRBY', pool, 'leased', units)
    out[#out + 1] = cb_recompute(pool)[2]
  else
    out[#out + 1] = 0
  end
  redis.call('HSET', lease, 'info', ARGV[5 + 4 * i], 'units', units, 'expires', expires, 'seq', 1,
    'interruptible', ARGV[6 + 4 * i], 'pool', pool)
  redis.call('SADD', leases, lease_id)
  if mode == 'check' then redis.call('HSET', lease, 'pending', 1) end
  if ARGV[6 + 4 * i] == '1' then redis.call('SADD', KEYS[3], lease_id) end
  redis.call('ZADD', KEYS[1], expires, lease_id)
end
return out
