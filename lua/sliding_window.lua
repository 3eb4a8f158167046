-- sliding_window: the two-counter approximation of a sliding window. The estimate is the
-- current window's count plus the previous window's count weighted by the share of it the
-- sliding window still covers, rounded up; a request fits when estimate + cost <= quota.
-- Because the estimate includes the whole current count, no aligned window ever admits more
-- than `quota`; inside the window the previous count is assumed evenly spread.
--
-- KEY    a string "<current window number>:<its count>:<previous window's count>".
-- ARGV   (the limit's slot in decide.lua) p1 = quota, p2 = window us, p3 unused.
-- Result allowed, remaining units, reset us, retry_after us,
--        receipt = the window number the units went into, new state, ttl.
-- TTL    until the end of the window after the current one (the current count weighs on it),
--        plus the slack.
-- The weighting uses ceil(previous * (window - elapsed) / window) evaluated in doubles, left to
-- right; the memory store evaluates it identically, so both agree to the bit.
-- The stored state rolled to `now`: the window number (the newest seen: a clock that steps
-- back keeps counting in it), its count and the previous window's count.
local function sliding_window_state(key, now, window)
  local index = math.floor(now / window)
  local current, previous = 0, 0
  local v = redis.call('GET', key)
  if v then
    local i, c, p = string.match(v, '^(%d+):(%d+):(%d+)$')
    local stored = tonumber(i)
    if stored >= index then
      index = stored
      current = tonumber(c)
      previous = tonumber(p)
    elseif stored == index - 1 then
      previous = tonumber(c)
    end
  end
  return index, current, previous
end

local function sliding_window(key, now, quota, window, _, cost)
  local index, current, previous = sliding_window_state(key, now, window)
  local start = index * window
  local elapsed = now - start
  if elapsed < 0 then elapsed = 0 end
  if elapsed > window then elapsed = window end
  local weighted = 0
  if previous > 0 then
    weighted = math.ceil(previous * (window - elapsed) / window)
  end
  local estimate = weighted + current
  if estimate + cost <= quota then
    local reset = start + 2 * window - now
    if reset < 0 then reset = 0 end
    return 1, quota - estimate - cost, reset, 0, index,
      string.format('%d:%d:%d', index, current + cost, previous), (index + 2) * window - now
  end
  local reset = 0
  if current > 0 then
    reset = start + 2 * window - now
  elseif previous > 0 then
    reset = start + window - now
  end
  if reset < 0 then reset = 0 end
  local retry
  if quota >= cost + current and previous > 0 then
    -- smallest elapsed e with ceil(previous * (window - e) / window) <= room
    local room = quota - cost - current
    local earliest = window - math.floor(room * window / previous)
    if earliest < 0 then earliest = 0 end
    retry = earliest - elapsed
    if retry < 1 then retry = 1 end
  else
    -- wait for the next window, where this window's count becomes the weighted previous one
    local room = quota - cost
    local earliest = 0
    if current > 0 then
      local f = math.floor(room * window / current)
      if f > window then f = window end
      earliest = window - f
    end
    retry = (window - elapsed) + earliest
  end
  local remaining = quota - estimate
  if remaining < 0 then remaining = 0 end
  return 0, remaining, reset, retry, 0
end

-- Gives back `cost` units admitted in window `receipt`, wherever that window now sits.
local function sliding_window_refund(key, receipt, _quota, _window, _unused, cost)
  local v = redis.call('GET', key)
  if not v then return end
  local i, c, p = string.match(v, '^(%d+):(%d+):(%d+)$')
  local index = tonumber(i)
  c, p = tonumber(c), tonumber(p)
  if index == receipt then
    c = c - cost
    if c < 0 then c = 0 end
  elseif index == receipt + 1 then
    p = p - cost
    if p < 0 then p = 0 end
  else
    return
  end
  redis.call('SET', key, string.format('%d:%d:%d', index, c, p), 'KEEPTTL')
end

-- Counts `cost` units more than were reserved in the current window, even past the quota.
local function sliding_window_charge(key, now, _quota, window, _unused, cost)
  local index, current, previous = sliding_window_state(key, now, window)
  redis.call('SET', key, string.format('%d:%d:%d', index, current + cost, previous),
    'PX', ttl_ms((index + 2) * window - now))
end
