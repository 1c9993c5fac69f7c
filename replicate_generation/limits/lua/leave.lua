-- KEYS: queue, tickets, leases, released. ARGV: now, ticket, its lease id, tombstone keep.
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
-- A grant whose answer was lost: the caller never learned of the lease, so it goes too.
if redis.call('ZREM', KEYS[3], ARGV[3]) == 1 then
  bury(KEYS[4], {ARGV[3]}, clock(ARGV[1]), tonumber(ARGV[4]))
end
redis.call('PUBLISH', ARGV[5], '')  -- those behind it moved up
