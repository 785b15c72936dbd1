-- Request: queued → cancelled (its tenant) | expired (its deadline passed). Only from
-- queued, or from a claim whose expiry passed (its claimer died; were it only slow, its
-- settle is refused and it gives its grant back): a request being placed or done is
-- refused with its state.
-- KEYS[1] the request hash
-- ARGV[1] new state ('cancelled' or 'expired'), ARGV[2] updated_at (iso), ARGV[3] the record
--   (json; '' keeps it), ARGV[4] now (epoch s)
-- Reply: {1} done, or {0, current state} ('' when there is no record)
local f = redis.call('HMGET', KEYS[1], 'state', 'claim_until')
local state = f[1]
if not (state == 'queued' or (state == 'placing' and tonumber(f[2]) <= tonumber(ARGV[4]))) then
  return {0, state or ''}
end
redis.call('HDEL', KEYS[1], 'claim', 'claim_until')
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'record', ARGV[3]) end
return {1}
