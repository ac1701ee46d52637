//! What `apisix.upstream` (lua/apisix/upstream.lua) and `ctx.upstream_id` need from the
//! gateway: a plugin picks the request's upstream (traffic-split), by id or by making one.
//! The choice lands in [`Ctx::upstream_choice`] and the proxy uses it (src/proxy/chosen.rs).

use mlua::{Lua, LuaSerdeExt, Table, Value};

use super::runtime::with_ctx;
use crate::plugin::ctx::UpstreamChoice;
use crate::plugin::Ctx;

/// An upstream configuration from a Lua table, checked as the config file's are; the error
/// names the bad field.
fn upstream_from(lua: &Lua, conf: Table) -> Result<crate::config::Upstream, String> {
    let value: serde_json::Value = lua
        .from_value(Value::Table(conf))
        .map_err(|e| format!("invalid upstream: {e}"))?;
    let u: crate::config::Upstream =
        crate::config::from_value_at("", value).map_err(|e| e.to_string())?;
    crate::snapshot::check_upstream("", &u).map_err(|e| e.to_string())?;
    Ok(u)
}

fn chosen_id(c: &Ctx) -> Option<String> {
    match &c.upstream_choice {
        Some(UpstreamChoice::Id(id)) => Some(id.clone()),
        _ => None,
    }
}

pub(crate) fn install(lua: &Lua, mg: &Table) -> mlua::Result<()> {
    mg.set(
        "upstream_id_get",
        lua.create_function(|_, ()| with_ctx(|c| chosen_id(c)))?,
    )?;
    // `ctx.upstream_id = id`; nil takes back an id chosen earlier (not a made upstream).
    mg.set(
        "upstream_id_set",
        lua.create_function(|_, id: Option<String>| {
            with_ctx(|c| match id {
                Some(id) => c.upstream_choice = Some(UpstreamChoice::Id(id)),
                None => {
                    if matches!(c.upstream_choice, Some(UpstreamChoice::Id(_))) {
                        c.upstream_choice = None;
                    }
                }
            })
        })?,
    )?;
    // check(conf) -> true | false, err
    mg.set(
        "upstream_check",
        lua.create_function(|lua, conf: Table| match upstream_from(lua, conf) {
            Ok(_) => Ok((true, None)),
            Err(e) => Ok((false, Some(e))),
        })?,
    )?;
    // set(key, conf) -> true | nil, err
    mg.set(
        "upstream_set",
        lua.create_function(|lua, (key, conf): (String, Table)| {
            let u = match upstream_from(lua, conf) {
                Ok(u) => u,
                Err(e) => return Ok((None, Some(e))),
            };
            with_ctx(|c| {
                c.upstream_choice = Some(UpstreamChoice::Conf {
                    key,
                    conf: Box::new(u),
                })
            })?;
            Ok((Some(true), None))
        })?,
    )?;
    // exists(id) -> bool: a configured upstream of the request's snapshot
    mg.set(
        "upstream_exists",
        lua.create_function(|_, id: String| {
            with_ctx(|c| {
                c.route
                    .as_ref()
                    .is_some_and(|r| r.upstreams.contains_key(&id))
            })
        })?,
    )?;
    Ok(())
}
