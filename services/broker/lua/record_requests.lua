-- Request: accepted → placed | rejected, for the requests of many placements at once (the
-- confirmations of one batch): each is a request nobody else knows yet, decided by the call
-- that accepted it, so no from-state is checked. One call instead of one HSET per request,
-- and with them the batch's lookups (lease id -> region, a tenant's requests and leases by
-- time), which on a single Redis would otherwise be a command each (on Redis Cluster they
-- live in other hash slots and the broker sends them as commands).
-- KEYS[1..n] the request hashes, then one key per lookup
-- ARGV[1] n; ARGV[3i-1] request i's state, ARGV[3i] its updated_at (iso), ARGV[3i+1] its
--   record (json); then per lookup: 'h' (HSET) or 'z' (ZADD), the number of pairs c, then
--   c pairs (field, value) or (score, member)
-- Reply: the number of requests written
local n = tonumber(ARGV[1])
for i = 1, n do
  redis.call('HSET', KEYS[i], 'state', ARGV[3 * i - 1], 'updated_at', ARGV[3 * i], 'record', ARGV[3 * i + 1])
end
local a = 3 * n + 2
for k = n + 1, #KEYS do
  local command, c = (ARGV[a] == 'z') and 'ZADD' or 'HSET', tonumber(ARGV[a + 1])
  for first = 0, c - 1, 256 do  -- unpack has a stack limit: a few hundred pairs a command
    local args = {}
    for x = first, math.min(c, first + 256) - 1 do
      args[#args + 1] = ARGV[a + 2 + 2 * x]
      args[#args + 1] = ARGV[a + 3 + 2 * x]
    end
    redis.call(command, KEYS[k], unpack(args))
  end
  a = a + 2 + 2 * c
end
return n
