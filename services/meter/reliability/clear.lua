-- A batch of the reliability record's keys deleted while a rebuild clears the record,
-- only while the mark is still this replica's claim (a claim that lapsed may be another
-- replica's now, rebuilding: nothing of its record may go); the claim is renewed with
-- each batch, so a long clear keeps it.
-- KEYS: 1 the record's mark, 2.. keys of the record to delete (the mark among them is kept).
-- ARGV: 1 this replica's claim, 2 the claim's time to live (ms).
-- Returns how many keys were deleted, or -1 if the claim is not this replica's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local n = 0
for i = 2, #KEYS do
  if KEYS[i] ~= KEYS[1] then n = n + redis.call('UNLINK', KEYS[i]) end
end
return n
