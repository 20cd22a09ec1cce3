-- Argo CD resource actions for Sluice StreamingQuery resources (group
-- sluice.dev, kind StreamingQuery): suspend, resume and restart, offered in
-- the resource's Actions menu. This script says which apply to a query; each
-- action's script is actions/<name>/action.lua beside it.
--
-- Install them in Argo CD's `argocd-cm` ConfigMap (namespace argocd), beside
-- the health check (../health.lua), under the key
-- resource.customizations.actions.<group>_<kind>:
--
--   data:
--     resource.customizations.actions.sluice.dev_StreamingQuery: |
--       discovery.lua: |
--         <the contents of this file, indented>
--       definitions:
--       - name: suspend
--         action.lua: |
--           <the contents of actions/suspend/action.lua, indented>
--       - name: resume
--         action.lua: |
--           <the contents of actions/resume/action.lua, indented>
--       - name: restart
--         action.lua: |
--           <the contents of actions/restart/action.lua, indented>
--
-- What they do, through the StreamingQuery only (the operator does the rest):
-- - suspend sets spec.suspend: true (the engine pods stop, the checkpoint is
--   kept); resume sets it back to false. Both change the spec, so an
--   Application that syncs automatically puts back what Git says: suspend
--   through Git there, or turn self-heal off.
-- - restart sets the annotation sluice.dev/restartedAt to the time: the
--   operator rolls the engine pods (a continuous query), runs an
--   availableNow query's Job again, and gives a query stopped after too many
--   failures (Failed, RestartLimitExceeded) a new start. An annotation is not
--   part of the spec Argo CD compares, so it shows no drift.
--
-- Argo CD runs Lua 5.1 (gopher-lua) with `obj`; keep to Lua 5.1 and the base
-- library. Tested by e2e/argocd-health.sh.

local actions = {}
local spec = obj.spec or {}
local suspended = spec.suspend == true

actions["suspend"] = { ["disabled"] = suspended, ["iconClass"] = "fa fa-fw fa-pause" }
actions["resume"] = { ["disabled"] = not suspended, ["iconClass"] = "fa fa-fw fa-play" }
-- Nothing runs while suspended: resume instead.
actions["restart"] = { ["disabled"] = suspended, ["iconClass"] = "fa fa-fw fa-redo" }
return actions
