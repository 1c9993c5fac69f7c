-- KEYS: overrides. ARGV: now, then field, value ('' clears) pairs.
local now = clock(ARGV[1])
for i = 2, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. ' ' .. num(now)) end
end
