-- Idempotency key: pending -> done (the answer, remembered) or pending -> rolled_back
-- (nothing granted stays; the next claim starts afresh). Only the claim's owner.
-- KEYS[1] the key's hash
-- ARGV[1] claim token, ARGV[2] 'done' or 'rolled_back', ARGV[3] answer (done), ARGV[4] ttl (s),
-- ARGV[5] digest, ARGV[6] request id, ARGV[7] 'restore' to write a done answer the durable
-- record holds although Redis lost the key (absent or another claimer's pending)
-- Reply: 1 written; 0 the claim is not the caller's (taken over, gone, or already done)
local f = redis.call('HMGET', KEYS[1], 'state', 'token', 'version')
local mine = f[1] == 'pending' and f[2] == ARGV[1]
if not mine and not (ARGV[7] == 'restore' and f[1] ~= 'done') then return 0 end
if ARGV[2] == 'done' then
  redis.call('HSET', KEYS[1], 'state', 'done', 'answer', ARGV[3], 'digest', ARGV[5], 'request_id', ARGV[6],
    'version', (tonumber(f[3]) or 0) + 1)
else
  redis.call('HSET', KEYS[1], 'state', 'rolled_back', 'leases', '[]', 'version', (tonumber(f[3]) or 0) + 1)
end
redis.call('HDEL', KEYS[1], 'token')
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) * 1000)
return 1
