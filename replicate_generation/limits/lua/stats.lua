-- KEYS: leases, tickets, creates, rate. ARGV: now.
-- Returns in_flight, waiting, creates_last_minute, backoff_remaining, active (0/1).
local now = clock(ARGV[1])
local live, since = '(' .. num(now), '(' .. num(now - 60)
local in_flight = redis.call('ZCOUNT', KEYS[1], live, '+inf')
local waiting = redis.call('ZCOUNT', KEYS[2], live, '+inf')
local creates = redis.call('ZCOUNT', KEYS[3], since, num(now))
local pending = redis.call('ZCOUNT', KEYS[3], since, '+inf')
local backoff = math.max(0, (tonumber(redis.call('HGET', KEYS[4], 'backoff')) or 0) - now)
local active = in_flight + waiting + pending > 0 or backoff > 0
return {in_flight, waiting, creates, num(backoff), active and 1 or 0}
