-- sliding_log: exact. At most `quota` units in any `window` microseconds.
--
-- KEY    a sorted set with one member per admitted unit; score = member = its timestamp in us.
--        Timestamps are made strictly increasing per key (a unit admitted in the same
--        microsecond as the newest one takes newest + 1), so members are unique by construction:
--        no random suffix that could collide, no separate sequence key.
-- ARGV   (the limit's slot in decide.lua) p1 = quota, p2 = window us, p3 unused.
-- Result allowed, remaining units, reset us (newest unit leaves the window), retry_after us
--        (the unit that must leave for `cost` to fit leaves), both measured from `now` (units
--        of one burst may be stamped a few us ahead of it); receipt = the first stamp added
--        (the units are receipt .. receipt + cost - 1); state = that first stamp too (decide.lua
--        adds the members: sliding_log_commit); ttl.
-- TTL    until the newest unit leaves the window, plus the slack.
-- A clock that steps back counts from the newest timestamp stored.
-- With `peek` nothing is written: expired members are counted out instead of trimmed.
-- Trade-off: exact, but memory grows with the quota (one member per admitted unit).
local function sliding_log(key, now, quota, window, _, cost, peek)
  local base = now
  local newest = nil
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    newest = tonumber(last[2])
    if newest > base then base = newest end
  end
  local cutoff = base - window
  local expired = 0
  if peek then
    expired = redis.call('ZCOUNT', key, '-inf', cutoff)
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff)
  end
  local count = redis.call('ZCARD', key) - expired
  if count + cost <= quota then
    local first = base
    if newest ~= nil and newest + 1 > first then first = newest + 1 end
    local final = first + cost - 1
    return 1, quota - count - cost, final + window - now, 0, first, first, final + window - now
  end
  local needed = count + cost - quota
  local oldest = redis.call('ZRANGE', key, expired + needed - 1, expired + needed - 1, 'WITHSCORES')
  local newest_now = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  local remaining = quota - count
  if remaining < 0 then remaining = 0 end
  return 0, remaining, tonumber(newest_now[2]) + window - now,
    tonumber(oldest[2]) + window - now, 0
end

-- Adds the `cost` stamps first .. first + cost - 1 and sets the TTL.
local function sliding_log_commit(key, first, cost, ttl_us)
  local args = {}
  for t = first, first + cost - 1 do
    args[#args + 1] = t
    args[#args + 1] = string.format('%d', t)
    if #args >= 1000 then
      redis.call('ZADD', key, unpack(args))
      args = {}
    end
  end
  if #args > 0 then redis.call('ZADD', key, unpack(args)) end
  redis.call('PEXPIRE', key, ttl_ms(ttl_us))
end

-- Removes the `cost` stamps an admission added, starting at `receipt`.
local function sliding_log_refund(key, receipt, _quota, _window, _unused, cost)
  local members = {}
  for t = receipt, receipt + cost - 1 do
    members[#members + 1] = string.format('%d', t)
    if #members >= 1000 then
      redis.call('ZREM', key, unpack(members))
      members = {}
    end
  end
  if #members > 0 then redis.call('ZREM', key, unpack(members)) end
end
