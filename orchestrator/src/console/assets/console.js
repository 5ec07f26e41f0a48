// The console's own script (served from the orchestrator; no inline
// scripts, see the Content-Security-Policy): confirmations before actions,
// the CSRF token on htmx requests, and the live timeline of a saga.
(function () {
  "use strict";

  // A form (or the button that submits it) with data-confirm asks first.
  document.addEventListener("submit", function (event) {
    var submitter = event.submitter;
    var question =
      (submitter && submitter.dataset.confirm) || event.target.dataset.confirm;
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  // The timeline: WatchSaga's events, as server-sent events. The browser
  // reconnects by itself and sends the last seq it saw; "end" closes it
  // for good once the saga is done.
  function follow() {
    var timeline = document.getElementById("timeline");
    if (!timeline || !window.EventSource) {
      return;
    }
    var source = new EventSource(timeline.dataset.events);
    source.addEventListener("event", function (message) {
      timeline.insertAdjacentHTML("beforeend", message.data);
    });
    source.addEventListener("failure", function (message) {
      var item = document.createElement("li");
      item.className = "error";
      item.textContent = message.data;
      timeline.appendChild(item);
    });
    source.addEventListener("end", function () {
      source.close();
      timeline.dataset.ended = "true";
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", follow);
  } else {
    follow();
  }
})();
