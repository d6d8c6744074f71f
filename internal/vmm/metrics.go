package vmm

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics is the VMM's Prometheus registry: machines and processes by
// state (read from the loop at scrape time), placement latency and report
// lag.
type metrics struct {
	reg       *prometheus.Registry
	placement prometheus.Histogram
	lag       prometheus.Histogram
	reports   prometheus.Counter
}

func newMetrics(v *VMM) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		placement: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "dedi_placement_seconds", Help: "Time from POST /v1/processes to the LSPM's acceptance (or to ready with ?wait=ready).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		lag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "dedi_report_lag_seconds", Help: "Age of LSPM status reports when applied (clock skew included).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		reports: prometheus.NewCounter(prometheus.CounterOpts{Name: "dedi_status_reports_total", Help: "Status reports applied."}),
	}
	m.reg.MustRegister(m.placement, m.lag, m.reports, &stateCollector{v: v},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) reportLag(d time.Duration) {
	m.reports.Inc()
	if d < 0 {
		d = 0
	}
	m.lag.Observe(d.Seconds())
}

var (
	machinesDesc  = prometheus.NewDesc("dedi_machines", "Machines by fleet and state.", []string{"fleet", "state"}, nil)
	processesDesc = prometheus.NewDesc("dedi_processes", "Processes by fleet and state (ended ones kept in history included).", []string{"fleet", "state"}, nil)
)

// stateCollector counts machines and processes on the loop at scrape time.
type stateCollector struct{ v *VMM }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- machinesDesc
	ch <- processesDesc
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	type key struct{ fleet, state string }
	machines, processes := map[key]int{}, map[key]int{}
	if c.v.doWait(func(s *state) {
		for _, m := range s.machines {
			machines[key{m.m.Fleet, m.m.State}]++
		}
		for _, p := range s.processes {
			processes[key{p.Fleet, p.State}]++
		}
	}) != nil {
		return
	}
	for k, n := range machines {
		ch <- prometheus.MustNewConstMetric(machinesDesc, prometheus.GaugeValue, float64(n), k.fleet, k.state)
	}
	for k, n := range processes {
		ch <- prometheus.MustNewConstMetric(processesDesc, prometheus.GaugeValue, float64(n), k.fleet, k.state)
	}
}
