(function(){
var b=document.body,at=Date.parse(b.getAttribute("data-generated-at")),
limit=1000*Number(b.getAttribute("data-stale-after-s")),age=document.getElementById("age");
function text(s){s=Math.max(0,Math.round(s));if(s<120)return s+" s";if(s<7200)return Math.round(s/60)+" min";
return Math.round(s/3600)+" h";}
function check(){var old=Date.now()-at,stale=old>limit;b.classList.toggle("stale",stale);
age.textContent=stale?"STALE: this page was written "+text(old/1000)+" ago, more than "+
text(limit/1000)+" (3 intervals): the checker has stopped or cannot write it; its figures are out of date."
:"Written "+text(old/1000)+" ago by your clock; it counts as stale after "+text(limit/1000)+" (3 intervals).";}
check();setInterval(check,5000);
})();
