-- KEYS: leases, released. ARGV: now, lease id, tombstone keep.
local now = clock(ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[2])
bury(KEYS[2], {ARGV[2]}, now, tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[4], '')  -- the next in line, in any process, may enter now
