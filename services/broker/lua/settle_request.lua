-- Request: placing → placed | rejected | queued, by the claim's owner only. A claimer
-- whose claim was taken over (it outlived the claim) is refused: it gives its grant back.
-- KEYS[1] the request hash
-- ARGV[1] claim token, ARGV[2] new state, ARGV[3] updated_at (iso), ARGV[4] the record (json)
-- Reply: {1} settled, or {0, current state}
local f = redis.call('HMGET', KEYS[1], 'state', 'claim')
if f[1] ~= 'placing' or f[2] ~= ARGV[1] then return {0, f[1] or ''} end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated_at', ARGV[3], 'record', ARGV[4])
redis.call('HDEL', KEYS[1], 'claim', 'claim_until')
return {1}
