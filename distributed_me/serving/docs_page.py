"""``/docs``: the API's OpenAPI spec rendered by a page that needs nothing but this server.

FastAPI's Swagger UI loads its JavaScript and CSS from a CDN, so on an offline machine (or a cluster without egress)
``/docs`` is blank. This page is self-contained: inline CSS and a few lines of inline JavaScript that fetch
``openapi.json`` from the same server and list every route with its parameters, request body types and every status
code it can answer, with what each means.
"""

DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>distributed_me victim API</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.5em}.route{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.6em 1em}
.method{display:inline-block;min-width:4em;font-weight:bold;color:#fff;border-radius:4px;padding:0 .4em;
text-align:center}.get{background:#2a7ae2}.post{background:#2a9d4a}code{background:#f3f3f3;padding:0 .25em}
table{border-collapse:collapse}td{padding:.1em .8em .1em 0;vertical-align:top}
</style></head>
<body><h1 id="title">distributed_me victim API</h1><p id="description"></p>
<p>Machine-readable spec: <a href="openapi.json">openapi.json</a>. Authenticate with the <code>X-API-Key</code>
header. Bodies: <code>application/x-npy</code> (numpy.save bytes, no pickles) or <code>application/json</code>
(<code>{"images": [...], "dtype": "float32" | "uint8"}</code>).</p>
<div id="routes">Loading the spec…</div>
<script>
function esc(s){return String(s).replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));}
fetch("openapi.json").then(r=>r.json()).then(spec=>{
  document.getElementById("title").textContent=spec.info.title+" (v"+spec.info.version+")";
  document.getElementById("description").textContent=spec.info.description||"";
  const out=[];
  for(const [path,ops] of Object.entries(spec.paths)){
    for(const [method,op] of Object.entries(ops)){
      const params=(op.parameters||[]).map(p=>"<code>"+esc(p.name)+"</code> ("+esc(p.in)+")").join(", ");
      const codes=Object.entries(op.responses||{}).map(([c,r])=>
        "<tr><td><b>"+esc(c)+"</b></td><td>"+esc(r.description||"")+"</td></tr>").join("");
      out.push('<div class="route" data-path="'+esc(path)+'"><span class="method '+esc(method)+'">'+
        esc(method.toUpperCase())+"</span> <code>"+esc(path)+"</code> — "+esc(op.summary||"")+
        (params?"<br>Parameters: "+params:"")+"<table>"+codes+"</table></div>");
    }
  }
  document.getElementById("routes").innerHTML=out.join("");
}).catch(e=>{document.getElementById("routes").textContent="could not load openapi.json: "+e;});
</script></body></html>
"""
