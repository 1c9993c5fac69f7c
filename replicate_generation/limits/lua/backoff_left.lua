-- KEYS: rate. ARGV: now.
local until_ = tonumber(redis.call('HGET', KEYS[1], 'backoff')) or 0
return num(math.max(0, until_ - clock(ARGV[1])))
