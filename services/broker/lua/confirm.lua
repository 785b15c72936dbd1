-- Confirm reservations whose grants are durable: each lease gets its real expiry and loses
-- its pending mark. A lease that is gone (its provisional expiry passed and a sweeper ended
-- it) is not brought back: the broker hears which, and fails that grant.
-- KEYS[1] the region's lease-expiry zset, then KEYS[1+i] lease hash i (1-based)
-- ARGV[2i-1] lease id i, ARGV[2i] its expires_at
-- Reply: {confirmed_1, ...} with 1 when confirmed, 0 when the lease was gone
local out = {}
for i = 1, #KEYS - 1 do
  local lease, id, expires = KEYS[1 + i], ARGV[2 * i - 1], ARGV[2 * i]
  if redis.call('EXISTS', lease) == 1 then
    redis.call('HSET', lease, 'expires', expires)
    redis.call('HDEL', lease, 'pending')
    redis.call('ZADD', KEYS[1], expires, id)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
