-- The unread count among messages whose topic starts with a prefix.
-- KEYS: inbox, meta, rd, ur, del (see prelude.lua).
-- ARGV: now (ms), max_age (ms), topic prefix (as it reads inside a JSON
--       string, without quotes).
-- Reads the unread messages only: those above the cursor (skipping rd)
-- and those in ur; at most the inbox size.
-- Returns the count (0 for a user with no inbox).
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
trim(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), nil)
local prefix = ARGV[3]
local function matches(frame)
  local at = string.find(frame, '","topic":"', 1, true)
  return at ~= nil and string.sub(frame, at + 11, at + 10 + #prefix) == prefix
end
local count = 0
local pos = redis.call('HGET', KEYS[2], 'rid')
local last = redis.call('HGET', KEYS[2], 'last')
while lt(pos, last) do
  local e = redis.call('XRANGE', KEYS[1], '(' .. pos, '+', 'COUNT', 128)
  for _, m in ipairs(e) do
    if matches(m[2][4]) and not redis.call('ZSCORE', KEYS[3], m[1]) then count = count + 1 end
  end
  if #e < 128 then break end
  pos = e[#e][1]
end
local tn = string.format('%.0f', trimmed(KEYS[1], KEYS[2]))
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. tn, '+inf')) do
  local m = entry(KEYS[1], id)
  if m and matches(m[2][4]) then count = count + 1 end
end
return count
