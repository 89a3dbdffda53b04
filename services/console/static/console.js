// Live customer page: refresh the profile when the server says it changed (Server-Sent Events).
// The fragment is HTML rendered and escaped by the server; nothing here builds markup from data.
"use strict";
(function () {
  var live = document.getElementById("live");
  if (!live || !window.EventSource) { return; }
  var source = new EventSource(live.dataset.liveUrl);
  var busy = false;
  source.addEventListener("changed", function () {
    if (busy) { return; }
    busy = true;
    fetch(live.dataset.fragmentUrl, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { live.innerHTML = html; live.dataset.updated = String(Date.now()); })
      .catch(function () {})
      .then(function () { busy = false; });
  });
})();
