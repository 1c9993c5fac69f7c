-- KEYS: overrides, declarations, accounts. ARGV: now, own instance or '', account to mark or ''.
-- Returns the overrides (flat field, "value set_at") and the other live declarations.
local now = clock(ARGV[1])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[3], now, ARGV[3]) end
local declared = {}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local expires = tonumber(string.match(all[i + 1], '(%S+)$'))
  if all[i] ~= ARGV[2] and expires > now then table.insert(declared, all[i + 1]) end
end
return {redis.call('HGETALL', KEYS[1]), declared}
