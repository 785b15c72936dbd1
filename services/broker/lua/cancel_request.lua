-- Request: queued → cancelled (its tenant) | expired (its deadline passed). Only from
-- queued: a request being placed (placing) or done is refused with its state.
-- KEYS[1] the request hash
-- ARGV[1] new state ('cancelled' or 'expired'), ARGV[2] updated_at (iso), ARGV[3] the record (json; '' keeps it)
-- Reply: {1} done, or {0, current state} ('' when there is no record)
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' then return {0, state or ''} end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'record', ARGV[3]) end
return {1}
