// Charts of the console's pages, drawn with the vendored Apache ECharts (static/vendor, no CDN).
// Each chart's numbers come from the server as JSON in the element's data-chart attribute (the same
// numbers as the table beside it); nothing here evaluates code or builds markup from data. Tooltips
// are drawn by ECharts itself (renderMode "richText"), so no HTML with inline styles is ever made,
// which the console's Content-Security-Policy would refuse.
"use strict";
(function () {
  if (!window.echarts) { return; }
  var RISK = "#c0392b", PROPENSITY = "#2c7be5", FIRED = "#15803d", OTHER = "#7f8c8d";
  var TOOLTIP = { renderMode: "richText", confine: true };
  var DAY = 86400000;
  var OUTCOME_COLOURS = { "fired": FIRED, "held out": OTHER, "suppressed": "#d97706",
                          "backfill (recorded, not sent)": "#a78bfa" };

  function timeAxis() { return { type: "time", axisLabel: { hideOverlap: true } }; }
  function grid() { return { left: 56, right: 24, top: 48, bottom: 40, containLabel: true }; }

  var build = {
    heatmap: function (spec) {
      return {
        tooltip: TOOLTIP, grid: grid(),
        xAxis: { type: "category", data: spec.columns, name: "stage", nameLocation: "middle", nameGap: 28 },
        // The axis name above the axis: beside it, a long segment name ("potential_loyalist") ran into it.
        yAxis: { type: "category", data: spec.rows, name: "segment", nameLocation: "end", nameGap: 12 },
        visualMap: { min: 0, max: Math.max(1, spec.max), calculable: true, orient: "horizontal", left: "center",
                     top: 0, itemHeight: 120 },
        series: [{ type: "heatmap", name: "customers", data: spec.cells, label: { show: true } }]
      };
    },
    sankey: function (spec) {
      return {
        tooltip: TOOLTIP,
        series: [{ type: "sankey", left: 8, right: 140, top: 8, bottom: 8, nodeAlign: "justify",
                   emphasis: { focus: "adjacency" }, lineStyle: { color: "gradient", opacity: 0.4 },
                   data: spec.nodes.map(function (name) { return { name: name }; }), links: spec.links }]
      };
    },
    lines: function (spec) {
      return {
        tooltip: { renderMode: "richText", confine: true, trigger: "axis" }, legend: { type: "scroll", top: 0 },
        grid: grid(), xAxis: timeAxis(), yAxis: { type: "value", name: spec.unit, scale: true },
        series: spec.series.map(function (line) {
          return { type: "line", name: line.name, data: line.points, showSymbol: line.points.length < 3 };
        })
      };
    },
    bars: function (spec) {
      return {
        tooltip: TOOLTIP, grid: grid(),
        xAxis: { type: "value", name: spec.axis, minInterval: 1 },
        yAxis: { type: "category", inverse: true, data: spec.bars.map(function (b) { return b.label; }) },
        series: [{ type: "bar", name: spec.series, data: spec.bars.map(function (b) { return b.value; }),
                   label: { show: true, position: "right" } }]
      };
    },
    forest: function (spec) {
      var names = spec.rules.map(function (r) { return r.rule; });
      return {
        tooltip: TOOLTIP, legend: { top: 0 }, grid: grid(),
        xAxis: { type: "value", name: spec.unit },
        yAxis: { type: "category", inverse: true, data: names },
        series: [
          { type: "custom", name: "95% interval",
            data: spec.rules.map(function (r, i) { return [r.low, r.high, i]; }),
            encode: { x: [0, 1], y: 2 },
            renderItem: function (params, api) {
              var low = api.coord([api.value(0), api.value(2)]), high = api.coord([api.value(1), api.value(2)]);
              var tick = api.size([0, 1])[1] * 0.2;
              var style = { stroke: "#374151", lineWidth: 2 };
              return { type: "group", children: [
                { type: "line", shape: { x1: low[0], y1: low[1], x2: high[0], y2: high[1] }, style: style },
                { type: "line", shape: { x1: low[0], y1: low[1] - tick, x2: low[0], y2: low[1] + tick }, style: style },
                { type: "line", shape: { x1: high[0], y1: high[1] - tick, x2: high[0], y2: high[1] + tick },
                  style: style }
              ] };
            } },
          { type: "scatter", name: "uplift", symbolSize: 12, itemStyle: { color: "#111827" },
            data: spec.rules.map(function (r) { return [r.uplift, r.rule]; }),
            markLine: { silent: true, symbol: "none", lineStyle: { type: "dashed", color: "#9ca3af" },
                        data: [{ xAxis: 0 }], label: { formatter: "no effect" } } },
          { type: "scatter", name: "treated conversion", symbol: "triangle", itemStyle: { color: FIRED },
            data: spec.rules.map(function (r) { return [r.treated, r.rule]; }) },
          { type: "scatter", name: "hold-out conversion", symbol: "diamond", itemStyle: { color: OTHER },
            data: spec.rules.map(function (r) { return [r.holdout, r.rule]; }) }
        ]
      };
    },
    activity: function (spec) {
      // One bar per day, the outcomes stacked; the axis spans the whole window, so quiet days show as gaps.
      return {
        tooltip: { renderMode: "richText", confine: true, trigger: "axis" }, legend: { top: 0 }, grid: grid(),
        xAxis: { type: "time", min: spec.from_ms - DAY / 2, max: spec.to_ms + DAY / 2, axisLabel: { hideOverlap: true } },
        yAxis: { type: "value", name: "actions", minInterval: 1 },
        series: spec.series.map(function (line) {
          return { type: "bar", name: line.name, stack: "outcomes", data: line.points, barMaxWidth: 14,
                   itemStyle: { color: OUTCOME_COLOURS[line.name] } };
        })
      };
    },
    periods: function (spec) {
      return {
        tooltip: { renderMode: "richText", confine: true, trigger: "axis" }, legend: { type: "scroll", top: 0 },
        grid: grid(), xAxis: { type: "category", data: spec.periods, name: spec.bucket, axisLabel: { hideOverlap: true } },
        yAxis: { type: "value", name: "would fire", minInterval: 1 },
        series: spec.series.map(function (line) {
          return { type: "line", name: line.name, data: line.values, showSymbol: spec.periods.length < 40 };
        })
      };
    },
    stack: function (spec) {
      return {
        tooltip: { renderMode: "richText", confine: true, trigger: "axis" }, legend: { type: "scroll", top: 0 },
        grid: grid(), xAxis: { type: "value", name: spec.unit, minInterval: 1 },
        yAxis: { type: "category", inverse: true, data: spec.categories },
        series: spec.series.map(function (part) {
          return { type: "bar", name: part.name, stack: "total", data: part.values,
                   itemStyle: OUTCOME_COLOURS[part.name] ? { color: OUTCOME_COLOURS[part.name] } : undefined };
        })
      };
    },
    scores: function (spec) {
      return {
        tooltip: { renderMode: "richText", confine: true, trigger: "axis" }, legend: { top: 0 }, grid: grid(),
        xAxis: timeAxis(), yAxis: { type: "value", min: 0, max: 1 },
        series: [
          { type: "line", name: "churn risk", data: spec.risk, itemStyle: { color: RISK },
            markLine: { silent: true, symbol: "none", lineStyle: { type: "dashed", color: RISK },
                        label: { position: "insideEndTop", formatter: "{b}" },
                        data: spec.thresholds.map(function (t) { return { name: t.label, yAxis: t.value }; }) } },
          { type: "line", name: "purchase propensity", data: spec.propensity, itemStyle: { color: PROPENSITY } },
          { type: "scatter", name: "actions", symbol: "pin", symbolSize: 22,
            data: spec.actions.map(function (a) {
              return { name: a.rule + ": " + a.outcome.replace("_", " "), value: [a.t, 1],
                       itemStyle: { color: a.outcome === "fired" ? FIRED : OTHER } };
            }) }
        ]
      };
    }
  };

  function render(root) {
    var elements = (root || document).querySelectorAll("[data-chart]");
    Array.prototype.forEach.call(elements, function (element) {
      var previous = window.echarts.getInstanceByDom(element);
      if (previous) { previous.dispose(); }
      var spec = JSON.parse(element.getAttribute("data-chart"));
      var chart = window.echarts.init(element, null, { renderer: "svg" });
      chart.setOption(build[spec.kind](spec));
      element.setAttribute("data-rendered", spec.kind);
    });
  }

  window.touchstreamCharts = { render: render };
  render(document);
  window.addEventListener("resize", function () {
    Array.prototype.forEach.call(document.querySelectorAll("[data-rendered]"), function (element) {
      var chart = window.echarts.getInstanceByDom(element);
      if (chart) { chart.resize(); }
    });
  });
})();
