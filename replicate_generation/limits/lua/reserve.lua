-- KEYS: rate, creates, op. ARGV: now, kind, rpm, burst, ppm, max_wait, op id, op ttl (ms).
-- Returns the wait before the token may be used (too long: nothing spent).
local done = redis.call('GET', KEYS[3])
if done then return done end  -- a resent call: the first run already answered
local now, kind = clock(ARGV[1]), ARGV[2]
local rpm, burst, rate = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if kind == 'create' then
  rate = rpm
  local learned = tonumber(redis.call('HGET', KEYS[1], 'learned'))
  if learned and learned < rpm then rate, burst = learned, 1 end  -- learning: no burst
end
local interval = 60 / rate
-- During a shared back-off "now" is its end, so tokens taken during it stay spaced after it.
local arrival = math.max(now, tonumber(redis.call('HGET', KEYS[1], 'backoff')) or 0)
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat:' .. kind)) or arrival
local use_at = math.max(arrival, tat - (burst - 1) * interval)
if use_at - now <= tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'tat:' .. kind, math.max(tat, arrival) + interval)
  if kind == 'create' then  -- logged at its use time: what Replicate will see
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', num(now - 60))
    redis.call('ZADD', KEYS[2], use_at, ARGV[7])
  end
end
local wait = num(use_at - now)
redis.call('SET', KEYS[3], wait, 'PX', ARGV[8])
return wait
