-- Argo CD action "restart" of a StreamingQuery: sets the annotation
-- sluice.dev/restartedAt to the time (UTC), as `kubectl rollout restart` does
-- for a Deployment's template; the operator rolls the engine pods, or runs an
-- availableNow query again, and counts failures afresh. See ../discovery.lua.
local os = require("os")
if obj.metadata == nil then
  obj.metadata = {}
end
if obj.metadata.annotations == nil then
  obj.metadata.annotations = {}
end
obj.metadata.annotations["sluice.dev/restartedAt"] = os.date("!%Y-%m-%dT%H:%M:%SZ")
return obj
