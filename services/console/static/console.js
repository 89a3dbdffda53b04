// Live pages (customer, overview, rules): refresh the part that changed when the server says so
// (Server-Sent Events), and draw its charts again. The fragment is HTML rendered and escaped by
// the server; nothing here builds markup from data.
"use strict";
(function () {
  var live = document.getElementById("live");
  if (!live || !window.EventSource) { return; }
  var source = new EventSource(live.dataset.liveUrl);
  var busy = false;

  function disposeCharts(root) {
    if (!window.echarts) { return; }
    Array.prototype.forEach.call(root.querySelectorAll("[data-rendered]"), function (element) {
      var chart = window.echarts.getInstanceByDom(element);
      if (chart) { chart.dispose(); }
    });
  }

  source.addEventListener("changed", function () {
    if (busy) { return; }
    busy = true;
    fetch(live.dataset.fragmentUrl, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        // Tables opened to read the numbers stay open across the refresh.
        var open = Array.prototype.map.call(live.querySelectorAll("details[open][id]"), function (d) { return d.id; });
        disposeCharts(live);
        live.innerHTML = html;
        open.forEach(function (id) { var d = document.getElementById(id); if (d) { d.open = true; } });
        if (window.touchstreamCharts) { window.touchstreamCharts.render(live); }
        live.dataset.updated = String(Date.now());
      })
      .catch(function () {})
      .then(function () { busy = false; });
  });
})();
