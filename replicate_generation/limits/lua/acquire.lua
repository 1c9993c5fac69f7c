-- KEYS: leases, released, queue, tickets, seq. ARGV: now, ttl, max_concurrent, ticket, lease id,
-- tombstone keep. Returns the lease id, or nil while the caller must wait.
local now, ttl, limit = clock(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ticket, lease = ARGV[4], ARGV[5]
-- Purged inside the granting script: a dead holder's slot is back within ttl, no reaper.
bury(KEYS[2], redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', num(now)), now, tonumber(ARGV[6]))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', num(now))
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', num(now))) do
  redis.call('ZREM', KEYS[3], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', num(now))
if redis.call('ZSCORE', KEYS[1], lease) then return lease end  -- a resent call that already won
local seq = redis.call('ZSCORE', KEYS[3], ticket)
if not seq then
  seq = redis.call('INCR', KEYS[5])
  redis.call('ZADD', KEYS[3], seq, ticket)
end
redis.call('ZADD', KEYS[4], now + ttl, ticket)
local free = limit - redis.call('ZCARD', KEYS[1])
local ahead = redis.call('ZCOUNT', KEYS[3], '-inf', '(' .. seq)
-- FIFO: only the first `free` may enter (free <= 0: a lowered limit drains first); else the rank.
if ahead >= free then return ahead - free + 1 end
redis.call('ZREM', KEYS[3], ticket)
redis.call('ZREM', KEYS[4], ticket)
redis.call('ZREM', KEYS[2], lease)
redis.call('ZADD', KEYS[1], now + ttl, lease)
return lease
