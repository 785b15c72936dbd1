-- Request: queued → placing. The queue pass claims a request before it places it: a
-- cancel then fails (409), and no other pass places it. A claim whose expiry passed (its
-- claimer died or stalled) is taken over, so a crashed claimer's request is not stuck.
-- KEYS[1] the request hash
-- ARGV[1] claim token, ARGV[2] now (epoch s), ARGV[3] the claim's expiry (epoch s)
-- Reply: {1, record json} claimed, or {0, current state} ('' when there is no record)
local f = redis.call('HMGET', KEYS[1], 'state', 'claim_until', 'record')
if f[1] == 'queued' or (f[1] == 'placing' and tonumber(f[2]) <= tonumber(ARGV[2])) then
  redis.call('HSET', KEYS[1], 'state', 'placing', 'claim', ARGV[1], 'claim_until', ARGV[3])
  return {1, f[3]}
end
return {0, f[1] or ''}
