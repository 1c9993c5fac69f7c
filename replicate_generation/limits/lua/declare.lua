-- KEYS: declarations. ARGV: now, ttl, instance, "mc rpm burst ppm".
local now = clock(ARGV[1])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do  -- purged by the living processes' heartbeats: no reaper to fail
  local expires = tonumber(string.match(all[i + 1], '(%S+)$'))
  if expires <= now then redis.call('HDEL', KEYS[1], all[i]) end
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4] .. ' ' .. num(now + tonumber(ARGV[2])))
