-- KEYS: leases, queue, tickets. ARGV: now, ttl, max_concurrent, lease id, ticket, queue score.
-- A limit lowered during the grant: over it, the slot goes back and the ticket keeps its place.
local now, limit = clock(ARGV[1]), tonumber(ARGV[3])
if redis.call('ZCARD', KEYS[1]) <= limit then return 1 end
if redis.call('ZREM', KEYS[1], ARGV[4]) == 0 then return 1 end
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
redis.call('ZADD', KEYS[3], num(now + tonumber(ARGV[2])), ARGV[5])
return 0
