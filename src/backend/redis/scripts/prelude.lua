-- Helpers shared by the inbox scripts (append, replay, unread, mark_read,
-- center_*); scripts.rs puts this file in front of each of them.
--
-- parse(id) -> ms, seq; lt(x, y): id x is older than id y; fmt(ms, seq) -> id.
-- trim(inbox, meta, now, max_age, max_len): drops old messages, raises floor
--   and `tn`.
-- unread(inbox, meta, rd, ur, del) -> the unread count.
-- ensure(meta, now): creates the meta hash with a creation mark.
--
-- Per-message state (the message center). Every message has an ordinal
-- `n` (1, 2, ... in id order, stored in its entry; `seq` is the newest).
-- Besides the stream, one user's state is:
--   rn   ordinal of the read cursor: n <= rn is read unless in `ur`;
--   tn   every ordinal <= tn is gone (trimmed, or deleted below the oldest
--        kept message): the oldest kept message is tn + 1 or newer;
--   rd   sorted set: ids read above the cursor (score n);
--   ur   sorted set: ids unread at or below the cursor (score n);
--   del  sorted set: ids deleted above tn (score n).
-- So unread = (seq - max(rn, tn)) - |del above max(rn, tn)| - |rd above
-- max(rn, tn)| + |ur above tn|: O(log n), no scan. Set members at or below
-- tn are stale and never counted (ranges start above tn); center scripts
-- prune them. Without per-message state (the sets empty) this is the old
-- `seq - max(rn, seq - XLEN)`.
local function parse(id) local a, b = string.match(id, '^(%d+)-(%d+)$') return tonumber(a), tonumber(b) end
local function lt(x, y) local a1, b1 = parse(x) local a2, b2 = parse(y) return a1 < a2 or (a1 == a2 and b1 < b2) end
local function fmt(ms, seq) return string.format('%.0f-%.0f', ms, seq) end
-- Drops messages older than max_age and beyond max_len (oldest first), and
-- raises the floor to the newest id dropped: a resume from below the floor
-- is incomplete. (XINFO's max-deleted-entry-id does not count XTRIM.)
-- Message center: also sets tn to just below the oldest message kept (or
-- to seq when none is kept), so deleted ids below it stop counting; the
-- count trim reads one entry more than it drops to learn that ordinal.
-- The age check first reads the oldest entry (cheap): XREVRANGE from an id
-- older than every entry walks the whole stream backwards (measured 69 us
-- per call at a few hundred entries), so it runs only when something is
-- actually too old.
-- Returns the id of the oldest message kept (nil when none is): append.lua
-- keeps it in the meta hash as `ok` to skip the next trims.
local function trim(inbox, meta, now, max_age, max_len)
  local gone, first = nil, nil
  local cutoff = fmt(math.max(now - max_age, 0), 0)
  local oldest = redis.call('XRANGE', inbox, '-', '+', 'COUNT', 1)
  if #oldest > 0 and lt(oldest[1][1], cutoff) then
    local old = redis.call('XREVRANGE', inbox, '(' .. cutoff, '-', 'COUNT', 1)
    if #old > 0 then gone = old[1][1] end
  end
  if max_len then
    local k = redis.call('XLEN', inbox) - tonumber(max_len)
    if k > 0 then
      local e = redis.call('XRANGE', inbox, '-', '+', 'COUNT', k + 1)
      local id = e[k][1]
      if (not gone) or lt(gone, id) then gone = id first = e[k + 1] end
    end
  end
  if gone then
    local ms, seq = parse(gone)
    redis.call('XTRIM', inbox, 'MINID', fmt(ms, seq + 1))
    if not first then first = redis.call('XRANGE', inbox, '-', '+', 'COUNT', 1)[1] end
    local tn
    if first then tn = tonumber(first[2][2]) - 1 else tn = redis.call('HGET', meta, 'seq') end
    local floor = redis.call('HGET', meta, 'floor')
    if (not floor) or lt(floor, gone) then
      redis.call('HSET', meta, 'floor', gone, 'tn', tn)
    else
      redis.call('HSET', meta, 'tn', tn)
    end
    return first and first[1]
  end
  return oldest[1] and oldest[1][1]
end
-- tn (see above). Inboxes written before it existed never had a deletion,
-- so every ordinal up to seq - XLEN is gone.
local function trimmed(inbox, meta)
  local v = redis.call('HMGET', meta, 'tn', 'seq')
  if v[1] then return tonumber(v[1]) end
  return tonumber(v[2] or '0') - redis.call('XLEN', inbox)
end
local function unread(inbox, meta, rd, ur, del)
  local v = redis.call('HMGET', meta, 'seq', 'rn')
  local seq, rn = tonumber(v[1] or '0'), tonumber(v[2] or '0')
  local tn = trimmed(inbox, meta)
  local base = math.max(rn, tn)
  local above = '(' .. string.format('%.0f', base)
  local n = seq - base - redis.call('ZCOUNT', del, above, '+inf') - redis.call('ZCOUNT', rd, above, '+inf')
  return n + redis.call('ZCOUNT', ur, '(' .. string.format('%.0f', tn), '+inf')
end
-- Whether the kept message `id` with ordinal n is read.
local function is_read(id, n, rn, rd, ur)
  if n <= rn then return not redis.call('ZSCORE', ur, id) end
  return redis.call('ZSCORE', rd, id) ~= false
end
local function ensure(meta, now)
  if redis.call('EXISTS', meta) == 0 then
    local mark = fmt(now, 0)
    redis.call('HSET', meta, 'floor', mark, 'last', mark, 'seq', 0, 'rn', 0, 'rid', '0-0', 'tn', 0)
  end
end
-- Message center helpers (center_*.lua, mark_read.lua).
-- The stored entry of `id`, or nil (never stored, deleted or trimmed).
local function entry(inbox, id)
  return redis.call('XRANGE', inbox, id, id)[1]
end
-- Drops set members at or below tn: their messages are gone.
local function prune(rd, ur, del, tn)
  local upto = string.format('%.0f', tn)
  redis.call('ZREMRANGEBYSCORE', rd, '-inf', upto)
  redis.call('ZREMRANGEBYSCORE', ur, '-inf', upto)
  redis.call('ZREMRANGEBYSCORE', del, '-inf', upto)
end
-- How long a user's keys live after a write: the inbox's ttl plus the
-- slack within which append.lua skips refreshing it (ttl / 32), so every
-- key lives at least `ttl` after the last append (give or take the clock
-- skew between nodes, which the age trim has too).
local function slack(ttl) return math.floor(tonumber(ttl) / 32) end
local function lifetime(ttl) return tonumber(ttl) + slack(ttl) end
-- Every key of the user's inbox lives `lifetime(ttl)` more ms, the same for all, so
-- the sets never outlive the meta hash (appends extend the inbox and meta
-- only; by the time sets written now expire, every message they name is
-- older than max_age and trimmed).
local function touch(keys, ttl)
  local ms = lifetime(ttl)
  for i = 1, 5 do redis.call('PEXPIRE', keys[i], ms) end
end
-- `{"type":"changed","op":op,<extra>"count":count}`; ids are digits and
-- dashes, so they need no escaping.
local function changed_frame(op, ids, extra, count)
  local list = ''
  if ids then list = '"ids":["' .. table.concat(ids, '","') .. '"],' end
  if ids and #ids == 0 then list = '"ids":[],' end
  return '{"type":"changed","op":"' .. op .. '",' .. list .. extra .. '"count":' .. count .. '}'
end
-- Tells every connection of the user: `u<count>` when the count changed,
-- then `s<frame>` (codec.rs).
local function announce(channel, before, after, frame)
  if after ~= before then redis.call(PUBLISH, channel, 'u' .. after) end
  redis.call(PUBLISH, channel, 's' .. frame)
end
