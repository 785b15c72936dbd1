-- Request: replacing → placed | queued | failed, by the claim's owner only, recording
-- what became of the lease (`ended:<lease id>`: replaced by which leases, queued for
-- capacity, or stopped). A claimer whose claim was taken over is refused: it gives its
-- grant back. An empty outcome gives the claim up without deciding (the replacement
-- could not be tried now: Redis or the event store away); the event comes back.
-- KEYS[1] the request hash
-- ARGV[1] claim token, ARGV[2] the lease id, ARGV[3] new state, ARGV[4] updated_at (iso),
-- ARGV[5] the record (json; '' keeps it), ARGV[6] the outcome (json; '' = undecided)
-- Reply: {1} settled, or {0, current state}
local f = redis.call('HMGET', KEYS[1], 'state', 'claim', 'replacing')
if f[1] ~= 'replacing' or f[2] ~= ARGV[1] or f[3] ~= ARGV[2] then return {0, f[1] or ''} end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'updated_at', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'record', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'ended:' .. ARGV[2], ARGV[6]) end
redis.call('HDEL', KEYS[1], 'claim', 'claim_until', 'replacing')
return {1}
