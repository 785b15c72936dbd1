-- Opens a rebuilt reliability record to writes: its mark becomes the time the rebuild
-- began, if it is still this replica's claim (a claim that lapsed may be another's now).
-- KEYS: 1 the record's mark. ARGV: 1 this replica's claim, 2 the time (s since the epoch).
-- Returns 1 if opened, 0 if the claim was not this replica's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
