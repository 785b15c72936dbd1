-- Idempotency key: claim (docs/lifecycle.md, "Idempotency key"). One compare-and-set on
-- the key's hash; the caller learns which transition it got.
-- KEYS[1] the key's hash
-- ARGV[1] body digest, ARGV[2] request id (for a new claim), ARGV[3] claim token,
-- ARGV[4] now (unix ms), ARGV[5] stale after (ms), ARGV[6] ttl (s)
-- Reply:
--   {'claimed', version}                   absent or rolled_back -> pending (the caller's)
--   {'mismatch'}                           the key was used with another body
--   {'done', answer}                       the stored answer
--   {'busy', ms left}                      pending, its owner still within its deadline
--   {'stale', version, request_id, leases} pending past the owner's deadline -> pending
--                                          (the caller's), with what the owner had named,
--                                          which the caller resumes or rolls back
local h = KEYS[1]
local f = redis.call('HMGET', h, 'state', 'digest', 'since', 'request_id', 'answer', 'version', 'leases')
local state, version, now = f[1], tonumber(f[6]) or 0, tonumber(ARGV[4])
if state and f[2] ~= ARGV[1] then return {'mismatch'} end
if state == 'done' then return {'done', f[5]} end
if state == 'pending' then
  local age = now - (tonumber(f[3]) or 0)
  if age < tonumber(ARGV[5]) then return {'busy', tostring(tonumber(ARGV[5]) - age)} end
  redis.call('HSET', h, 'token', ARGV[3], 'since', now, 'version', version + 1)
  redis.call('PEXPIRE', h, tonumber(ARGV[6]) * 1000)
  return {'stale', version + 1, f[4] or '', f[7] or '[]'}
end
redis.call('HSET', h, 'state', 'pending', 'digest', ARGV[1], 'request_id', ARGV[2], 'token', ARGV[3],
  'since', now, 'version', version + 1, 'leases', '[]')
redis.call('HDEL', h, 'answer')
redis.call('PEXPIRE', h, tonumber(ARGV[6]) * 1000)
return {'claimed', version + 1}
