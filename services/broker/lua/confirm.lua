-- Confirm reservations whose grants are durable: each lease gets its real expiry and loses
-- its pending mark. A lease that is gone (its provisional expiry passed and a sweeper ended
-- it), or whose pool generation is gone (the pool was removed, and maybe registered again,
-- in between), is not confirmed: the broker hears which, and fails that grant.
-- ARGV[1] number of groups (a group: leases of one region); per group, from offset a:
--   ARGV[a] n leases, then ARGV[a+2i-1] lease id i, ARGV[a+2i] its expires_at (i 1-based)
-- KEYS per group, from offset k: KEYS[k] the region's lease-expiry zset, then per lease i
--   (1-based) KEYS[k+2i-1] its hash and KEYS[k+2i] its pool's hash
-- Reply: per group {confirmed_1, ...} with 1 when confirmed, 0 when the lease was gone
local replies, k, a = {}, 1, 2
for g = 1, tonumber(ARGV[1]) do
  local n, out = tonumber(ARGV[a]), {}
  for i = 1, n do
    local lease, pool, id, expires = KEYS[k + 2 * i - 1], KEYS[k + 2 * i], ARGV[a + 2 * i - 1], ARGV[a + 2 * i]
    local gen = tonumber(redis.call('HGET', lease, 'generation')) or 0
    local pool_gen = tonumber(redis.call('HGET', pool, 'generation')) or 0
    if redis.call('EXISTS', lease) == 1 and redis.call('EXISTS', pool) == 1 and cb_same_generation(gen, pool_gen) then
      redis.call('HSET', lease, 'expires', expires)
      redis.call('HDEL', lease, 'pending')
      redis.call('ZADD', KEYS[k], expires, id)
      out[i] = 1
    else
      out[i] = 0
    end
  end
  replies[g] = out
  k, a = k + 1 + 2 * n, a + 1 + 2 * n
end
return replies
