-- Idempotency key: the owner names what it is about to grant (a recovery point), before
-- the side effect. Only the claim's owner (its token) on a pending key.
-- KEYS[1] the key's hash
-- ARGV[1] claim token, ARGV[2] request id, ARGV[3] leases (JSON: [[region, lease id], ...])
-- Reply: 1 named; 0 the claim is not the caller's any more (taken over, or the key is gone)
local f = redis.call('HMGET', KEYS[1], 'state', 'token')
if f[1] ~= 'pending' or f[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'request_id', ARGV[2], 'leases', ARGV[3])
return 1
