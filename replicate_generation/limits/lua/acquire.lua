-- KEYS: leases, released, queue, tickets, vtime, fair. ARGV: now, ttl, max_concurrent, ticket,
-- lease id, tombstone keep, band, caller, step, fair keep. Returns {lease id, queue score}, or the rank.
local now, ttl, limit = clock(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ticket, lease = ARGV[4], ARGV[5]
-- Purged inside the granting script: a dead holder's slot is back within ttl, no reaper.
bury(KEYS[2], redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', num(now)), now, tonumber(ARGV[6]))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', num(now))
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', num(now))) do
  redis.call('ZREM', KEYS[3], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', num(now))
if redis.call('ZSCORE', KEYS[1], lease) then return {lease, ''} end  -- a resent call that already won
-- The score is band * 2^40 + start tag: interactive first, then fair start-time order.
local band_base = tonumber(ARGV[7]) * 1099511627776
local score = redis.call('ZSCORE', KEYS[3], ticket)
local fair_keep = math.ceil(tonumber(ARGV[10]) * 1000)
if not score then
  local v = tonumber(redis.call('GET', KEYS[5]) or '0')
  local start = math.max(v, tonumber(redis.call('HGET', KEYS[6], ARGV[8]) or '0'))
  redis.call('HSET', KEYS[6], ARGV[8], num(start + tonumber(ARGV[9])))
  redis.call('PEXPIRE', KEYS[6], fair_keep)
  score = band_base + start
  redis.call('ZADD', KEYS[3], num(score), ticket)
end
score = tonumber(score)
redis.call('ZADD', KEYS[4], now + ttl, ticket)
local free = limit - redis.call('ZCARD', KEYS[1])
local ahead = redis.call('ZCOUNT', KEYS[3], '-inf', '(' .. num(score))
-- In turn: only the first `free` may enter (free <= 0: a lowered limit drains first); else the rank.
if ahead >= free then return ahead - free + 1 end
redis.call('ZREM', KEYS[3], ticket)
redis.call('ZREM', KEYS[4], ticket)
redis.call('ZREM', KEYS[2], lease)
redis.call('ZADD', KEYS[1], now + ttl, lease)
-- The account's virtual time moves to the granted ticket's start.
local granted = score - band_base
if granted > tonumber(redis.call('GET', KEYS[5]) or '0') then
  redis.call('SET', KEYS[5], num(granted), 'PX', fair_keep)
else
  redis.call('PEXPIRE', KEYS[5], fair_keep)
end
return {lease, num(score)}
