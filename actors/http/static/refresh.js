// Partial refresh: every element with data-refresh="URL" is replaced by that URL's HTML every
// few seconds (the page's own template rendered with ?partial=1). Pauses while the tab is hidden.
(function () {
  var PERIOD_MS = 3000;
  function refresh() {
    if (document.hidden) return;
    document.querySelectorAll("[data-refresh]").forEach(function (el) {
      var focus = document.activeElement;  // never swap a form out from under the person typing in it
      if (focus && focus !== document.body && el.contains(focus) && focus.tagName !== "BUTTON") return;
      fetch(el.getAttribute("data-refresh"), {credentials: "same-origin"})
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html === null) return;
          var box = document.createElement("div");
          box.innerHTML = html;
          var fresh = box.querySelector("#" + el.id);
          if (fresh) el.replaceWith(fresh);
        })
        .catch(function () {});
    });
  }
  setInterval(refresh, PERIOD_MS);
})();
