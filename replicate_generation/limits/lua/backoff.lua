-- KEYS: rate. ARGV: now, seconds, rpm, episode, cut.
local now, seconds, rpm = clock(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local until_ = math.max(tonumber(redis.call('HGET', KEYS[1], 'backoff')) or 0, now + seconds)
redis.call('HSET', KEYS[1], 'backoff', until_)
local tat = math.max(tonumber(redis.call('HGET', KEYS[1], 'tat:create')) or until_, until_)
local learned = tonumber(redis.call('HGET', KEYS[1], 'learned'))
local cut_at = tonumber(redis.call('HGET', KEYS[1], 'cut_at'))
-- 429s closer together than the episode are one: one cut; then the schedule restarts.
if not learned or now - cut_at >= math.max(seconds, tonumber(ARGV[4])) then
  local current = math.min(learned or rpm, rpm)
  redis.call('HSET', KEYS[1], 'learned', math.max(1, current * tonumber(ARGV[5])), 'cut_at', now)
  tat = until_
end
redis.call('HSET', KEYS[1], 'tat:create', tat)
