-- Extend an open lease that has not expired yet.
-- KEYS[1] region lease-expiry zset, KEYS[2] lease hash, KEYS[3] region lease outbox (optional:
-- the lease.renewed owed is written there, docs/lifecycle.md "Outbox")
-- ARGV[1] lease id, ARGV[2] now, ARGV[3] new expiry, ARGV[4] lease json (with the new expiry),
-- ARGV[5] the event's at (RFC 3339)
-- Reply: {1, seq} or {0} (gone or already expired)
local f = redis.call('HMGET', KEYS[2], 'expires', 'seq')
if not f[1] or tonumber(f[1]) <= tonumber(ARGV[2]) then return {0} end
local seq = tonumber(f[2]) + 1
redis.call('HSET', KEYS[2], 'expires', ARGV[3], 'info', ARGV[4], 'seq', seq)
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
if KEYS[3] then
  redis.call('HSET', KEYS[3], ARGV[1] .. '.' .. seq, cjson.encode({k = 'lease.renewed', i = ARGV[4], s = seq,
    t = ARGV[5], w = ARGV[2]}))
end
return {1, seq}
