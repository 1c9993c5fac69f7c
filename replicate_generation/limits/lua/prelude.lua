-- Shared by every script: the clock, and %.17g numbers (tostring's 14 digits lose sub-ms times).
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.17g', x) end
-- Tombstones: a purged or released lease must never be revived by a late renew.
local function bury(key, ids, now, keep)
  for _, id in ipairs(ids) do redis.call('ZADD', key, now, id) end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now - keep))
  if #ids > 0 then redis.call('PEXPIRE', key, math.ceil(keep * 1000)) end
end
