-- Request: accepted → placed | rejected, for the requests of many placements at once (the
-- confirmations of one batch): each is a request nobody else knows yet, decided by the call
-- that accepted it, so no from-state is checked. One call instead of one HSET per request.
-- KEYS[i] request i's hash
-- ARGV[3i-2] its state, ARGV[3i-1] updated_at (iso), ARGV[3i] the record (json)
-- Reply: the number of requests written
for i = 1, #KEYS do
  redis.call('HSET', KEYS[i], 'state', ARGV[3 * i - 2], 'updated_at', ARGV[3 * i - 1], 'record', ARGV[3 * i])
end
return #KEYS
