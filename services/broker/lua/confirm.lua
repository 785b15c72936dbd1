-- Confirm reservations whose grants are durable: each lease gets its real expiry and loses
-- its pending mark. A lease that is gone (its provisional expiry passed and a sweeper ended
-- it), or whose pool generation is gone (the pool was removed, and maybe registered again,
-- in between), is not confirmed: the broker hears which, and fails that grant.
-- A lease that delivers (a provision deadline > 0) becomes 'provisioning' here, its deadline
-- indexed for the provision-timeout sweep; a capacity-only lease has no state field, which
-- reads as 'ready' (docs/lifecycle.md, "Lease").
-- ARGV[1] number of groups (a group: leases of one region); per group, from offset a:
--   ARGV[a] n leases, then ARGV[a+3i-2] lease id i, ARGV[a+3i-1] its expires_at,
--   ARGV[a+3i] its provision deadline (epoch s; 0 = capacity only) (i 1-based)
-- KEYS per group, from offset k: KEYS[k] the region's lease-expiry zset, KEYS[k+1] the
--   region's provisioning zset, then per lease i (1-based) KEYS[k+2i] its hash and
--   KEYS[k+2i+1] its pool's hash
-- Reply: per group {confirmed_1, ...} with 1 when confirmed, 0 when the lease was gone
local replies, k, a = {}, 1, 2
for g = 1, tonumber(ARGV[1]) do
  local n, out = tonumber(ARGV[a]), {}
  for i = 1, n do
    local lease, pool = KEYS[k + 2 * i], KEYS[k + 2 * i + 1]
    local id, expires, deadline = ARGV[a + 3 * i - 2], ARGV[a + 3 * i - 1], tonumber(ARGV[a + 3 * i]) or 0
    local f = redis.call('HMGET', lease, 'generation', 'pending')
    local gen = tonumber(f[1]) or 0
    local pool_gen = tonumber(redis.call('HGET', pool, 'generation')) or 0
    if redis.call('EXISTS', lease) == 1 and redis.call('EXISTS', pool) == 1 and cb_same_generation(gen, pool_gen) then
      redis.call('HSET', lease, 'expires', expires)
      redis.call('ZADD', KEYS[k], expires, id)
      if deadline > 0 and f[2] then  -- the first confirmation only: a second one changes no state
        redis.call('HSET', lease, 'state', 'provisioning', 'deadline', deadline)
        redis.call('ZADD', KEYS[k + 1], deadline, id)
      end
      redis.call('HDEL', lease, 'pending')
      out[i] = 1
    else
      out[i] = 0
    end
  end
  replies[g] = out
  k, a = k + 2 + 2 * n, a + 1 + 3 * n
end
return replies
