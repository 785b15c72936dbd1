-- Release a lock only if this owner still holds it (compare-and-delete): an owner whose
-- lock expired and was taken by another must not delete the other's.
-- KEYS[1] the lock; ARGV[1] the owner's token
-- Reply: 1 released, 0 not held by this owner
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
