-- Request: accepted → queued (create-only). A request id is queued once; the rebuild after
-- a Redis loss puts a queued request back only where Redis has no record of it.
-- KEYS[1] the request hash
-- ARGV[1] the record (json), ARGV[2] updated_at (iso)
-- Reply: {1} queued, or {0, current state}
local state = redis.call('HGET', KEYS[1], 'state')
if state then return {0, state} end
redis.call('HSET', KEYS[1], 'state', 'queued', 'updated_at', ARGV[2], 'record', ARGV[1])
return {1}
